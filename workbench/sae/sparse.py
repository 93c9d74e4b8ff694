"""The sparse training path: the batch top-k selection as an index set (`Kept`), found without a full
top-k over B*F, and the encoder/decoder products restricted to the k*B kept entries, forward and backward.
The two rules the SAE modules encode with (`jumprelu` at inference, `batch_topk` dense) are here too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workbench.dist import Collective

if TYPE_CHECKING:
    from workbench.sae.modules import SAE

CPU_KERNELS = True  # the CPU kernels (workbench.sae.kernels) for tensors on CPU; False: torch's operations everywhere


def _cpu_kernels(pre_BF: torch.Tensor, bias_F: torch.Tensor | None = None):
    """workbench.sae.kernels when they take pre_BF (float32, contiguous, on CPU, and no autograd graph to
    carry: the kernels' values are plain arrays), else None. Imported on first use: numba takes a second to
    import, and a process that never selects on CPU does not need it."""
    if not (CPU_KERNELS and pre_BF.device.type == "cpu" and pre_BF.dtype == torch.float32 and pre_BF.dim() == 2
            and pre_BF.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (pre_BF.requires_grad or (bias_F is not None and bias_F.requires_grad)):
        return None
    from workbench.sae import kernels
    return kernels


@dataclass
class Kept:
    """The kept entries of a [B, F] code, in row-major order: rows [N], cols [N] (int64).

    The sparse products over them: `row_sums(vals, W_FD)` is the [B, F] code times W ([B, D]),
    `col_sums(vals, X_BD)` its transpose times X ([F, D], the weight gradients), both as
    `embedding_bag` sums (twice as fast as the CSR product on CPU, measured); `dots(X_BD, W_FD)` is
    <X[b], W[f]> at each kept (b, f) (the decoder's backward), by latent (each W row read once).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    _row_starts: torch.Tensor | None = field(default=None, repr=False)
    _col_order: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def from_flat(flat_idx: torch.Tensor, shape: tuple[int, int]) -> Kept:
        """From sorted indices into the flattened [B*F] code."""
        return Kept(*_row_col(flat_idx, shape[1]), shape)

    def __len__(self) -> int:
        return self.rows.numel()

    def row_sums(self, vals_N: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
        """For each row b, the sum over its kept (b, f) of vals * W[f]: [B, D]."""
        if self._row_starts is None:
            self._row_starts = _crow(self.rows, self.shape[0])[:-1]
        return torch.nn.functional.embedding_bag(self.cols, W_FD, self._row_starts, mode="sum",
                                                 per_sample_weights=vals_N)

    def col_sums(self, vals_N: torch.Tensor, X_BD: torch.Tensor) -> torch.Tensor:
        """For each column f, the sum over its kept (b, f) of vals * X[b], b ascending: [F, D]."""
        order, rows, col_crow = self._by_column()
        return torch.nn.functional.embedding_bag(rows, X_BD, col_crow[:-1], mode="sum",
                                                 per_sample_weights=vals_N.index_select(0, order))

    def dots(self, X_BD: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
        """<X[b], W[f]> for each kept (b, f), row-major: [N]. Computed latent by latent (the transposed
        code's sampled product, then put back in row order): a W row is read once, not once per entry
        (3x faster than by rows at F 16384, the same at F 4096, measured; the same values)."""
        order, rows, col_crow = self._by_column()
        code_t = _csr(col_crow, rows, X_BD.new_zeros(len(self)), self.shape[::-1])
        by_column_N = torch.sparse.sampled_addmm(code_t, W_FD, X_BD.T, beta=0.0).values()
        return torch.empty_like(by_column_N).index_copy_(0, order, by_column_N)

    def _by_column(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the column-major order of the entries, their rows in it, the column pointers [F + 1])."""
        if self._col_order is None:  # the entries are row-major: a stable sort by column
            if CPU_KERNELS and self.cols.device.type == "cpu":
                from workbench.sae import kernels
                self._col_order = kernels.by_column(self.rows, self.cols, self.shape[1])
            else:
                order = torch.sort(self.cols.to(torch.int32), stable=True).indices
                self._col_order = (order, self.rows.index_select(0, order), _crow(self.cols, self.shape[1]))
        return self._col_order

    def dense(self, vals_N: torch.Tensor) -> torch.Tensor:
        out_BF = torch.zeros(self.shape, dtype=vals_N.dtype, device=vals_N.device)
        return out_BF.index_put_((self.rows, self.cols), vals_N)

    def by_group(self, bounds: list[int]) -> Kept:
        """Each row split by latent group (group g: bounds[g] <= col < bounds[g + 1]): entry (b, f) moves
        to row b * G + g of a [B * G, F] code, whose product with W_dec holds each group's part of each
        reconstruction. Row-major order is kept: within a row, the groups are column ranges."""
        inner = torch.tensor(bounds[1:-1], device=self.cols.device)
        group_N = torch.bucketize(self.cols, inner, right=True)
        n_groups = len(bounds) - 1
        grouped = Kept(self.rows * n_groups + group_N, self.cols, (self.shape[0] * n_groups, self.shape[1]))
        # A column's entries keep their order (its group is fixed): the column-major order is shared.
        order, _, col_crow = self._by_column()
        grouped._col_order = (order, grouped.rows.index_select(0, order), col_crow)
        return grouped


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _crow(rows_N: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows_N, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def batch_topk_select(pre_BF: torch.Tensor, n_keep: int, comm: Collective | None = None,
                      bias_F: torch.Tensor | None = None) -> tuple[Kept, torch.Tensor]:
    """The batch top-k rule as an index set: the n_keep largest entries of relu(pre_BF + bias_F),
    positive only (bias_F None: of relu(pre_BF)).

    pre_BF may be taken before the relu (the trainer saves that pass over B*F), and without the
    encoder bias (bias_F, added only to the entries read: pre_BF + bias_F is never formed in one
    process). Returns (kept, vals_N). In one process the set is exactly
    `relu(pre + bias).flatten().topk(n_keep)`'s minus its zero entries (which carry neither value nor
    gradient), ties at the cut included: topk itself breaks them. Across data-parallel processes
    (`comm`, each holding an equal share of the global batch), n_keep counts the global batch and the
    selection is global; ties at the cut go to the lowest rank.
    """
    if comm is None or comm.world_size == 1:
        idx, vals = _topk_entries(pre_BF, min(n_keep, pre_BF.numel()), bias_F)
    else:
        flat = (pre_BF if bias_F is None else pre_BF + bias_F).reshape(-1)
        idx = _global_topk_indices(flat, n_keep, comm)
        vals = flat.index_select(0, idx)
    positive = vals > 0
    if not bool(positive.all()):
        idx, vals = idx[positive], vals[positive]
    return Kept.from_flat(idx, tuple(pre_BF.shape)), vals


def _topk_entries(pre_BF: torch.Tensor, n: int, bias_F: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat indices of `relu(pre + bias).flatten().topk(n)` and their values, found without a
    full top-k when possible.

    A quantile of a strided sample gives a cut that leaves ~1.5x n candidates above it; the n-th
    largest value is then found among the candidates only (one pass over the whole of [B, F]: the CPU
    kernel, else a compare and `nonzero`; every other pass is over the candidates, on CPU by the radix
    selection of `kernels.top_n`). Without the bias in pre_BF, the compare
    is against cut - bias_F - margin a latent (margin: far above the rounding of the two subtractions),
    and the candidates count only if at least n of their exact values exceed the cut itself: then
    every entry left out is below the cut, hence below the n-th largest. Too few candidates, or a tie
    straddling the cut (not rare in float32 at these sizes), and topk itself decides, as in the reference.
    """
    F = pre_BF.shape[1]
    flat = pre_BF.reshape(-1)
    at = _sample_slice(flat)
    sample = flat[at]
    if bias_F is not None:
        sample = sample + bias_F[torch.arange(at.start, flat.numel(), at.step, device=flat.device) % F]
    cut = _candidate_cut(sample, n / flat.numel(), flat.numel())
    if cut is not None:
        if bias_F is None:
            cand_idx = _entries_above(pre_BF, pre_BF.new_full((F,), cut), n)
        else:
            margin = 1e-4 * (abs(cut) + float(bias_F.detach().abs().max()))
            cand_idx = _entries_above(pre_BF, (cut - margin) - bias_F, n)
        kernels = _cpu_kernels(pre_BF, bias_F)
        if kernels is not None and cand_idx.numel() >= n:
            picked = kernels.top_n(pre_BF, bias_F, cand_idx, n, cut)
            if picked is not None:
                return picked
        elif cand_idx.numel() >= n:
            cand_vals = flat.index_select(0, cand_idx)
            if bias_F is not None:
                cand_vals += bias_F.index_select(0, _row_col(cand_idx, F)[1])
            if int((cand_vals > cut).sum()) >= n:
                keep = cand_vals >= cand_vals.topk(n, sorted=False).values.min()
                if int(keep.sum()) == n:
                    keep_idx = torch.nonzero(keep).squeeze(1)
                    return cand_idx.index_select(0, keep_idx), cand_vals.index_select(0, keep_idx)
    if bias_F is not None:
        flat = (pre_BF + bias_F).reshape(-1)
    idx = torch.relu(flat).topk(n, sorted=False).indices.sort().values
    return idx, flat.index_select(0, idx)


def _entries_above(pre_BF: torch.Tensor, thr_F: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted flat indices of pre_BF > thr_F (a threshold a column; 2n-3n of them expected): one pass of
    the CPU kernel, else the compare and `nonzero`."""
    pre_BF, thr_F = pre_BF.detach(), thr_F.detach()  # indices only
    kernels = _cpu_kernels(pre_BF)
    if kernels is not None:
        return kernels.entries_above(pre_BF, thr_F, 4 * n)
    return _sparse_nonzero((pre_BF > thr_F).view(-1))


def auxk_select(pre_BF: torch.Tensor, dead_M: torch.Tensor, k_aux: int,
                bias_F: torch.Tensor | None = None) -> tuple[Kept, torch.Tensor]:
    """The aux-k rule as an index set: each token's k_aux largest entries of relu(pre_BF + bias_F)
    among the dead latents (sorted indices dead_M), positive only. Returns (kept, vals_N), row-major.

    Exactly the reference's `relu(pre[:, dead]).topk(k_aux, dim=1)` minus its zero entries, ties at a
    token's cut included (a tie straddling it, and topk decides that token). A per-token floor from
    block maxima (`_row_floors`) leaves ~1.4x k_aux candidates a token, and at least k_aux of them: each
    token's k_aux-th largest value is found among those only. On CPU the CPU kernel (`kernels.row_top`)
    does all of it in one pass a token. Elsewhere, without the reference's copy of every dead column:
    with at least as many dead latents as live ones, pre_BF is overwritten in place (by pre_BF + bias_F,
    the live columns by -inf); with fewer, the dead columns are gathered first, which moves less memory
    than one pass over [B, F].
    """
    B, F = pre_BF.shape
    M = dead_M.numel()
    k_aux = min(k_aux, M)
    kernels = _cpu_kernels(pre_BF, bias_F)
    if kernels is not None:  # one pass a row on CPU (pre_BF is left as it is)
        rows_N, cols_N, vals_N, tied_T = kernels.row_top(pre_BF, dead_M, k_aux, bias_F)
        if tied_T.numel():
            dead_TM = pre_BF.index_select(0, tied_T).index_select(1, dead_M)
            if bias_F is not None:
                dead_TM += bias_F.index_select(0, dead_M)
            return _merge_reference_rows(rows_N, cols_N, vals_N, tied_T, dead_TM, dead_M, (B, F), k_aux)
        return Kept(rows_N, cols_N, (B, F)), vals_N
    if 2 * M < F:  # fewer dead than live latents: gather them ([B, M] moves less than a [B, F] pass)
        sub_BM, col_of = pre_BF.index_select(1, dead_M), dead_M
        if bias_F is not None:
            sub_BM += bias_F.index_select(0, dead_M)
    else:
        sub_BM, col_of = pre_BF if bias_F is None else pre_BF.add_(bias_F), None
        if M < F:
            live_F = torch.ones(F, dtype=torch.bool, device=pre_BF.device)
            live_F[dead_M] = False
            sub_BM.masked_fill_(live_F, -math.inf)
    cut_B = _row_floors(sub_BM, k_aux)
    flat_N = _sparse_nonzero((sub_BM > cut_B[:, None]).view(-1))
    rows_N, cols_N = _row_col(flat_N, sub_BM.shape[1])
    counts_B = torch.bincount(rows_N, minlength=B)
    vals_N = sub_BM.view(-1).index_select(0, flat_N)
    if bool(((counts_B < k_aux) & (cut_B > 0)).any()):  # a floor that did not hold (NaN): decide exactly
        return _auxk_reference(_dead_columns(sub_BM, col_of, dead_M), dead_M, F, k_aux)
    C = int(counts_B.max()) if len(flat_N) else 0
    if C > k_aux:  # each token's k_aux-th largest candidate: the candidates laid out one padded row a token
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        slot_N = rows_N * C + torch.arange(len(rows_N), device=rows_N.device) - starts_B.index_select(0, rows_N)
        padded_BC = vals_N.new_full((B, C), -math.inf)
        padded_BC.view(-1).index_copy_(0, slot_N, vals_N)
        kth_B = padded_BC.topk(k_aux, dim=1, sorted=False).values.min(dim=1).values
        keep_N = (vals_N >= kth_B.index_select(0, rows_N)) & (vals_N > 0)
        tied_B = torch.bincount(rows_N[keep_N], minlength=B) > counts_B.clamp_max(k_aux)
        if bool(tied_B.any()):  # a tie straddles these tokens' cuts: topk decides them
            return _with_reference_rows(sub_BM, col_of, dead_M, F, k_aux, rows_N, cols_N, vals_N, keep_N, tied_B)
        keep_idx = torch.nonzero(keep_N).squeeze(1)
        rows_N, cols_N, vals_N = (t.index_select(0, keep_idx) for t in (rows_N, cols_N, vals_N))
    if col_of is not None:
        cols_N = col_of.index_select(0, cols_N)  # increasing: the order stays row-major
    return Kept(rows_N, cols_N, (B, F)), vals_N


def _row_floors(sub_BM: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, a cut (>= 0) above which lie all of the row's k largest entries, and at least k entries
    when it is positive; 0 (every positive entry a candidate) for rows shorter than 8k.

    The maxima of 2k disjoint (strided) blocks of the row: the k-th largest of them, t, is the maximum
    of k different blocks, so at least k entries are >= t, and the row's k-th largest value is >= t.
    Every entry >= t is a candidate (the cut is t's float predecessor): ~1.4k a row.
    """
    B, M = sub_BM.shape
    n_blocks = 2 * k
    if 8 * k > M:
        return sub_BM.new_zeros(B)
    size = M // n_blocks
    block_max_BN = sub_BM[:, : size * n_blocks].unflatten(1, (size, n_blocks)).amax(dim=1)
    t_B = block_max_BN.topk(k, dim=1, sorted=False).values.amin(dim=1)
    return torch.where(t_B > 0, torch.nextafter(t_B, t_B.new_tensor(-math.inf)), 0.0)


def _dead_columns(sub_BM: torch.Tensor, col_of: torch.Tensor | None, dead_M: torch.Tensor) -> torch.Tensor:
    """The dead latents' values [B, M] (sub_BM itself when it was gathered)."""
    return sub_BM if col_of is not None else sub_BM.index_select(1, dead_M)


def _with_reference_rows(sub_BM: torch.Tensor, col_of: torch.Tensor | None, dead_M: torch.Tensor, F: int, k: int,
                         rows_N: torch.Tensor, cols_N: torch.Tensor, vals_N: torch.Tensor, keep_N: torch.Tensor,
                         tied_B: torch.Tensor) -> tuple[Kept, torch.Tensor]:
    """The kept candidates of the rows without a tie, and the reference's picks for the rows with one
    (tied_B), merged in row-major order."""
    keep_idx = torch.nonzero(keep_N & ~tied_B.index_select(0, rows_N)).squeeze(1)
    rows_N, cols_N, vals_N = (t.index_select(0, keep_idx) for t in (rows_N, cols_N, vals_N))
    if col_of is not None:
        cols_N = col_of.index_select(0, cols_N)
    tied_T = torch.nonzero(tied_B).squeeze(1)
    dead_TM = _dead_columns(sub_BM.index_select(0, tied_T), col_of, dead_M)
    return _merge_reference_rows(rows_N, cols_N, vals_N, tied_T, dead_TM, dead_M, (tied_B.numel(), F), k)


def _merge_reference_rows(rows_N: torch.Tensor, cols_N: torch.Tensor, vals_N: torch.Tensor, tied_T: torch.Tensor,
                          dead_TM: torch.Tensor, dead_M: torch.Tensor, shape: tuple[int, int], k: int
                          ) -> tuple[Kept, torch.Tensor]:
    """The picks of the rows without a tie (rows_N, cols_N, vals_N) and the reference's picks for the rows
    tied_T (their dead latents' values dead_TM [T, M]), merged in row-major order."""
    F = shape[1]
    ref, ref_vals_N = _auxk_reference(dead_TM, dead_M, F, k)
    rows_N = torch.cat([rows_N, tied_T.index_select(0, ref.rows)])
    cols_N = torch.cat([cols_N, ref.cols])
    vals_N = torch.cat([vals_N, ref_vals_N])
    order_N = torch.sort(rows_N * F + cols_N).indices
    return Kept(rows_N[order_N], cols_N[order_N], shape), vals_N[order_N]


def _auxk_reference(dead_BM: torch.Tensor, dead_M: torch.Tensor, F: int, k: int) -> tuple[Kept, torch.Tensor]:
    """The reference's rule on the dead columns' values dead_BM [B, M]: relu(.).topk(k, dim=1),
    positive only, row-major (each token's k picks sorted within its row: no sort over all B * k)."""
    B = dead_BM.shape[0]
    top = torch.relu(dead_BM).topk(k, dim=1, sorted=False)
    picks_BK, order_BK = top.indices.sort(dim=1)
    vals_BK = top.values.gather(1, order_BK)
    positive = vals_BK > 0
    rows_BK = torch.arange(B, device=dead_BM.device)[:, None].expand_as(picks_BK)
    return Kept(rows_BK[positive], dead_M.index_select(0, picks_BK[positive]), (B, F)), vals_BK[positive]


def _global_topk_indices(flat: torch.Tensor, n: int, comm: Collective) -> torch.Tensor:
    """Sorted local indices of this process's share of the global top-n (the same candidate scheme)."""
    n = min(n, int(comm.cat(torch.tensor([flat.numel()], device=flat.device)).sum()))
    cut = _candidate_cut(comm.cat(flat[_sample_slice(flat)]), n / (flat.numel() * comm.world_size), flat.numel())
    cand_idx = torch.nonzero(flat > cut).squeeze(1) if cut is not None else None
    counts = comm.cat(torch.tensor([-1 if cand_idx is None else cand_idx.numel()], device=flat.device))
    if bool((counts < 0).any()) or int(counts.sum()) < n:
        cand_idx = torch.arange(flat.numel(), device=flat.device)
        counts = comm.cat(torch.tensor([flat.numel()], device=flat.device))
    cand_vals = flat[cand_idx]
    # The n-th largest value of all processes' candidates: each sends its own top min(n, width).
    width = min(n, int(counts.max()))
    padded = torch.full((width,), -math.inf, dtype=flat.dtype, device=flat.device)
    local_top = cand_vals.topk(min(width, cand_vals.numel()), sorted=False).values
    padded[: local_top.numel()] = local_top
    cutoff = comm.cat(padded).topk(n, sorted=False).values.min()
    if cutoff <= 0:
        return torch.nonzero(flat > 0).squeeze(1)
    keep = cand_vals > cutoff
    tied = torch.nonzero(cand_vals == cutoff).squeeze(1)
    # Ties at the cut: the lowest ranks' entries first, until n are kept in all.
    n_above = int(comm.cat(keep.sum().reshape(1)).sum())
    tied_before = int(comm.cat(torch.tensor([tied.numel()], device=flat.device))[: comm.rank].sum())
    keep[tied[: max(0, n - n_above - tied_before)]] = True
    return cand_idx[keep]


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The sorted indices of a flat bool mask's few True entries (here ~1-10%): `nonzero` over its
    8-byte words first, then within the words that hold any (half the time of one `nonzero` over the
    bytes at 1%, measured)."""
    if mask.numel() % 8:
        return torch.nonzero(mask).squeeze(1)
    hit = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    local = torch.nonzero(mask.view(-1, 8).index_select(0, hit).view(-1)).squeeze(1)
    return (hit.index_select(0, local >> 3) << 3) + (local & 7)


def _row_col(flat_N: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of indices into a flattened [*, width]: by shift and mask when width is a power of
    two (int64 division is ten times slower, measured)."""
    if width & (width - 1) == 0:
        shift = width.bit_length() - 1
        return flat_N >> shift, flat_N & (width - 1)
    return flat_N // width, flat_N % width


def _sample_slice(flat: torch.Tensor) -> slice:
    """~8192 entries, strided; the stride odd, so a power-of-two F does not alias it onto few columns."""
    stride = flat.numel() // 8192 | 1
    return slice(stride // 2, None, stride)


def _candidate_cut(sample: torch.Tensor, frac: float, numel: int) -> float | None:
    """A value with (very likely) more than frac * numel entries above it, from a strided sample."""
    if frac > 0.05 or numel < 1 << 14:
        return None
    expected = frac * sample.numel()
    m = min(sample.numel(), int(1.5 * expected + 4 * math.sqrt(expected)) + 8)
    cut = sample.topk(m).values[-1].item()
    return cut if cut > 0 else None


def jumprelu(pre_BF: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """The inference rule: each token's pre-activations above the threshold (strict >), the rest zero ([B, F])."""
    return pre_BF * (pre_BF > threshold)


def batch_topk(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k*B largest entries of pre_BF over the whole flattened batch; zero the rest ([B, F])."""
    kept, vals_N = batch_topk_select(pre_BF, k * pre_BF.shape[0])
    return kept.dense(vals_N)


class _EncodeKept(torch.autograd.Function):
    """The kept pre-activations as a differentiable function of the encoder: the forward takes the
    values already computed (dense, without autograd) and the backward touches only the kept entries."""

    @staticmethod
    def forward(ctx, vals_N, x_BD, b_dec_D, W_enc_DF, b_enc_F, kept: Kept):
        ctx.save_for_backward(x_BD, b_dec_D, W_enc_DF)
        ctx.kept = kept
        return vals_N.clone()

    @staticmethod
    def backward(ctx, g_N):
        x_BD, b_dec_D, W_enc_DF = ctx.saved_tensors
        kept: Kept = ctx.kept
        # Kept entries are positive, so relu passes the gradient unchanged (or there is no relu).
        g_b_enc_F = torch.zeros(kept.shape[1], dtype=g_N.dtype, device=g_N.device).index_add_(0, kept.cols, g_N)
        g_W_enc_FD = kept.col_sums(g_N, x_BD - b_dec_D)
        g_b_dec_D = -(W_enc_DF @ g_b_enc_F)
        return None, None, g_b_dec_D, g_W_enc_FD.T, g_b_enc_F, None


class _DecodeKept(torch.autograd.Function):
    """f @ W_dec for a code with N kept entries: O(N * D) forward and backward instead of O(B * F * D)."""

    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, kept: Kept):
        W_dec_FD = W_dec_FD.contiguous()
        ctx.save_for_backward(vals_N, W_dec_FD)
        ctx.kept = kept
        return kept.row_sums(vals_N, W_dec_FD)

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec_FD = ctx.saved_tensors
        kept: Kept = ctx.kept
        g_BD = g_BD.contiguous()
        # d/d f[b, f] = <g[b], W_dec[f]>, evaluated only where f is kept.
        g_vals_N = kept.dots(g_BD, W_dec_FD)
        g_W_dec_FD = kept.col_sums(vals_N, g_BD)
        return g_vals_N, g_W_dec_FD, None


def encode_kept(sae: SAE, x_BD: torch.Tensor, vals_N: torch.Tensor, kept: Kept) -> torch.Tensor:
    """The kept latents' values [N] (equal to vals_N), with gradients to W_enc, b_enc and b_dec."""
    return encode_kept_with(vals_N, x_BD, sae.b_dec, sae.W_enc_DF, sae.b_enc_F, kept)


def encode_kept_with(vals_N: torch.Tensor, x_BD: torch.Tensor, b_dec_D: torch.Tensor, W_enc_DF: torch.Tensor,
                     b_enc_F: torch.Tensor, kept: Kept) -> torch.Tensor:
    """`encode_kept` on given weights: vals_N [N] as the kept entries of (x - b_dec) @ W_enc + b_enc, with
    their gradients to those three (no relu between: the entries may be negative)."""
    return _EncodeKept.apply(vals_N, x_BD, b_dec_D, W_enc_DF, b_enc_F, kept)


def decode_kept(f_N: torch.Tensor, W_dec_FD: torch.Tensor, kept: Kept) -> torch.Tensor:
    """sum over kept (b, f) of f[b, f] * W_dec[f] -> [B, D], without b_dec."""
    return _DecodeKept.apply(f_N, W_dec_FD, kept)
