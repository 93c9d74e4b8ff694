"""CPU kernels of the training step's two selections (numba), where torch needs several passes.

On CPU, torch finds the entries of a [B, F] float32 tensor above a cut by a compare (a bool [B, F]
mask, ~3 ms at B 1024 / F 4096 on one thread: it does not vectorise) and `nonzero` over the mask; the
aux-k rule adds a row-wise top-k over padded candidates. Each kernel here reads the tensor once, a row
at a time, and writes only what it keeps:
    `entries_above`   the flat indices of pre_BF > thr_F (a threshold a column), ascending: the batch
                      top-k's candidates (half the time of compare + `nonzero`, measured);
    `row_top`         each row's k largest positive entries among given columns, ascending, with the rows
                      whose k-th value is tied (or NaN) flagged for torch's topk to decide;
    `top_n`           the batch top-k among those candidates (a partition, where torch takes a topk);
    `by_column`       the kept entries in column order (a counting sort, where torch sorts).
Both only compare the float32 values they are given (and add the bias in float32, as torch does), so
their results are those of the torch code they replace, exactly (tests/test_kernels.py).

They run serially per row block, `nogil`, one block per torch thread in a small thread pool (torch's own
compare is parallel, so the kernels stay at least as fast at every thread count).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _above(pre_RF, thr_F, row0, out_N):  # pragma: no cover - compiled
    """Flat indices (rows offset by row0) of pre_RF > thr_F, ascending, into out_N; returns their count
    (all of them, also past out_N's length: the caller then retries with room for them)."""
    R, F = pre_RF.shape
    cap = out_N.shape[0]
    n = 0
    body = F - F % 8
    for r in range(R):
        row = pre_RF[r]
        base = (row0 + r) * F
        for f0 in range(0, body, 8):  # a cheap test of 8 entries first: most blocks hold none
            hit = False
            for f in range(f0, f0 + 8):
                hit |= row[f] > thr_F[f]
            if hit:
                for f in range(f0, f0 + 8):
                    if row[f] > thr_F[f]:
                        if n < cap:
                            out_N[n] = base + f
                        n += 1
        for f in range(body, F):
            if row[f] > thr_F[f]:
                if n < cap:
                    out_N[n] = base + f
                n += 1
    return n


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _row_top(pre_RF, bias_F, has_bias, cols_M, k, cols_out, vals_out, counts_R, flagged_R):  # pragma: no cover
    """Per row r: the k largest positive entries of (pre + bias)[r, cols_M], in the order of cols_M, into
    cols_out/vals_out [R * k] at r * k; counts_R their number; flagged_R rows a tie at the k-th value
    (or a NaN) leaves to the caller."""
    R = pre_RF.shape[0]
    M = cols_M.shape[0]
    n_blocks = 2 * k
    size = M // n_blocks if 8 * k <= M else 0
    row_vals = np.empty(M, dtype=np.float32)
    block_max = np.empty(n_blocks, dtype=np.float32)
    cand_vals = np.empty(M, dtype=np.float32)
    cand_at = np.empty(M, dtype=np.int64)
    every = M == pre_RF.shape[1]  # every column (cols_M is then 0..F-1): read the row as it lies
    for r in range(R):
        counts_R[r] = 0
        flagged_R[r] = False
        if every:
            row = pre_RF[r]
            if has_bias:
                for m in range(M):
                    row_vals[m] = row[m] + bias_F[m]
            else:
                row_vals[:] = row
        else:
            for m in range(M):
                row_vals[m] = pre_RF[r, cols_M[m]] + (bias_F[cols_M[m]] if has_bias else np.float32(0.0))
        bad = False
        for m in range(M):
            bad |= row_vals[m] != row_vals[m]
        if bad:
            flagged_R[r] = True
            continue
        # A floor under the k-th largest value: the k-th largest of 2k block maxima is the maximum of k
        # different blocks, so at least k entries reach it (0: every positive entry is a candidate).
        cut = np.float32(0.0)
        if size > 0:
            block_max[:] = row_vals[:n_blocks]
            for i in range(1, size):  # (np.maximum vectorises where a loop does not: no NaN is left here)
                np.maximum(block_max, row_vals[i * n_blocks:(i + 1) * n_blocks], block_max)
            t = np.partition(block_max, n_blocks - k)[n_blocks - k]
            if t > 0:
                cut = np.nextafter(t, np.float32(-np.inf))
        c = 0
        body = M - M % 8
        for m0 in range(0, body, 8):  # 8 entries tested at once first: most hold no candidate
            hit = False
            for m in range(m0, m0 + 8):
                hit |= row_vals[m] > cut
            if hit:
                for m in range(m0, m0 + 8):
                    if row_vals[m] > cut:
                        cand_vals[c] = row_vals[m]
                        cand_at[c] = m
                        c += 1
        for m in range(body, M):
            if row_vals[m] > cut:
                cand_vals[c] = row_vals[m]
                cand_at[c] = m
                c += 1
        if c > k:
            kth = np.partition(cand_vals[:c], c - k)[c - k]
            kept = 0
            for i in range(c):
                if cand_vals[i] >= kth:
                    kept += 1
            if kept > k:  # a tie straddles the k-th value: which of them topk keeps is topk's to say
                flagged_R[r] = True
                continue
        else:
            kth = np.float32(-np.inf)
        at = r * k
        n = 0
        for i in range(c):
            if cand_vals[i] >= kth:
                cols_out[at + n] = cols_M[cand_at[i]]
                vals_out[at + n] = cand_vals[i]
                n += 1
        counts_R[r] = n
    return 0


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _by_column(rows_N, cols_N, order_N, rows_out_N, crow_F):  # pragma: no cover - compiled
    """A counting sort of the entries by column, stable: their order, their rows in it, the column pointers."""
    crow_F[:] = 0
    for i in range(cols_N.shape[0]):
        crow_F[cols_N[i] + 1] += 1
    for f in range(crow_F.shape[0] - 1):
        crow_F[f + 1] += crow_F[f]
    slot_F = crow_F[:-1].copy()
    for i in range(cols_N.shape[0]):
        at = slot_F[cols_N[i]]
        order_N[at] = i
        rows_out_N[at] = rows_N[i]
        slot_F[cols_N[i]] = at + 1
    return 0


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _nth_largest_key(keys_N, n):  # pragma: no cover - compiled
    """The n-th largest of keys_N (uint32), by radix selection: 11, 11 and 10 bits at a time, each pass a
    histogram of the entries that share the bits found so far (numba's np.partition is 2.5x slower)."""
    prefix = np.uint32(0)
    mask = np.uint32(0)
    left = n
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        counts = np.zeros(1 << bits, dtype=np.int64)
        for i in range(keys_N.shape[0]):
            key = keys_N[i]
            if key & mask == prefix:
                counts[(key >> shift) & ((1 << bits) - 1)] += 1
        digit = (1 << bits) - 1
        while counts[digit] < left:
            left -= counts[digit]
            digit -= 1
        prefix |= np.uint32(digit) << shift
        mask |= np.uint32((1 << bits) - 1) << shift
    return prefix


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _top_n(flat, bias_F, has_bias, cand_N, n, cut, keep_idx_n, keep_vals_n):  # pragma: no cover - compiled
    """Of the candidates (flat indices cand_N into pre), the n largest of pre + bias, into keep_*; returns 0,
    or 1 when fewer than n candidates exceed the cut, 2 when the n-th value is tied with one left out.
    (No candidate is NaN: each one is above its threshold.)"""
    N = cand_N.shape[0]
    F = bias_F.shape[0]
    pow2 = F & (F - 1) == 0
    vals = np.empty(N, dtype=np.float32)
    keys = np.empty(N, dtype=np.uint32)  # the floats' order as unsigned integers
    above = 0
    for i in range(N):
        v = flat[cand_N[i]]
        if has_bias:
            v = v + bias_F[cand_N[i] & (F - 1) if pow2 else cand_N[i] % F]
        vals[i] = v
        above += v > cut
    if above < n:
        return 1
    bits = vals.view(np.int32)
    for i in range(N):
        b = bits[i]
        keys[i] = np.uint32(b ^ ((b >> 31) | np.int32(-2147483648))) if b < 0 else np.uint32(b) | np.uint32(2147483648)
    kth_key = _nth_largest_key(keys, n)
    kept = 0
    for i in range(N):
        if keys[i] >= kth_key:
            if kept < n:
                keep_idx_n[kept] = cand_N[i]
                keep_vals_n[kept] = vals[i]
            kept += 1
    return 0 if kept == n else 2


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _blocks(n_rows: int) -> list[tuple[int, int]]:
    """Row blocks, one a torch thread."""
    threads = max(1, min(torch.get_num_threads(), n_rows))
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _map(fn, blocks: list[tuple[int, int]]) -> list:
    if len(blocks) == 1:
        return [fn(*blocks[0])]
    key = (os.getpid(), len(blocks))  # a pool does not survive a fork: one a process
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(max_workers=len(blocks))
    return list(_pools[key].map(lambda b: fn(*b), blocks))


def entries_above(pre_BF: torch.Tensor, thr_F: torch.Tensor, expected: int) -> torch.Tensor:
    """The flat indices [N] (int64, ascending) of the entries of pre_BF [B, F] above their column's
    threshold thr_F [F] (strict >, as torch.gt: NaN is never above). `expected`: a guess of N, the
    room first given (more is found by a second pass). pre_BF: float32, contiguous, on CPU."""
    pre = pre_BF.numpy()
    thr = thr_F.detach().to(torch.float32).contiguous().numpy()

    def block(lo: int, hi: int) -> np.ndarray:
        room = max(1024, (expected * (hi - lo)) // pre.shape[0] * 5 // 4)
        out = np.empty(room, dtype=np.int64)
        n = _above(pre[lo:hi], thr, lo, out)
        if n > room:
            out = np.empty(n, dtype=np.int64)
            _above(pre[lo:hi], thr, lo, out)
        return out[:n]

    parts = _map(block, _blocks(pre.shape[0]))
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def row_top(pre_BF: torch.Tensor, cols_M: torch.Tensor, k: int, bias_F: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's k largest positive entries of (pre_BF + bias_F)[:, cols_M] (cols_M [M] int64), the aux-k
    rule's picks: (rows [N], cols [N], vals [N], flagged rows [T]), row-major and ascending within a row
    (cols_M: sorted, distinct). A flagged row (its k-th value tied with an entry left out, or a NaN) has no picks
    here: topk decides it. pre_BF: float32, contiguous, on CPU; bias_F float32 [F] or None."""
    B = pre_BF.shape[0]
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, pre_BF.new_zeros(0), empty
    pre = pre_BF.numpy()
    has_bias = bias_F is not None
    bias = (bias_F.detach().to(torch.float32).contiguous() if has_bias else pre_BF.new_zeros(1)).numpy()
    cols = cols_M.to(torch.int64).contiguous().numpy()
    cols_out = np.empty(B * k, dtype=np.int64)
    vals_out = np.empty(B * k, dtype=np.float32)
    counts = np.empty(B, dtype=np.int64)
    flagged = np.empty(B, dtype=np.bool_)

    def block(lo: int, hi: int) -> None:
        _row_top(pre[lo:hi], bias, has_bias, cols, k, cols_out[lo * k:hi * k], vals_out[lo * k:hi * k],
                 counts[lo:hi], flagged[lo:hi])

    _map(block, _blocks(B))
    counts_B = torch.from_numpy(counts)
    # Row r's picks are the first counts[r] of its k slots.
    keep = (torch.arange(k)[None, :] < counts_B[:, None]).view(-1)
    at_N = torch.nonzero(keep).squeeze(1)
    rows_N = torch.arange(B).repeat_interleave(counts_B)
    return (rows_N, torch.from_numpy(cols_out).index_select(0, at_N),
            torch.from_numpy(vals_out).index_select(0, at_N), torch.nonzero(torch.from_numpy(flagged)).squeeze(1))


def by_column(rows_N: torch.Tensor, cols_N: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries (rows_N, cols_N: int64 [N], on CPU) in column order, stable: (their order [N], their rows in
    that order [N], the column pointers [n_cols + 1]); `torch.sort(cols, stable=True)`'s order, by one count
    and one placement pass (a fourth of its time at N 32768, measured)."""
    order = np.empty(cols_N.numel(), dtype=np.int64)
    rows = np.empty(cols_N.numel(), dtype=np.int64)
    crow = np.empty(n_cols + 1, dtype=np.int64)
    _by_column(rows_N.contiguous().numpy(), cols_N.contiguous().numpy(), order, rows, crow)
    return torch.from_numpy(order), torch.from_numpy(rows), torch.from_numpy(crow)


def top_n(pre_BF: torch.Tensor, bias_F: torch.Tensor | None, cand_N: torch.Tensor, n: int, cut: float
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The n largest entries of pre_BF + bias_F among the candidates cand_N (ascending flat indices, from
    `entries_above`): (their flat indices [n], ascending; their values [n]), or None when the candidates
    do not settle it (fewer than n of them above `cut`, or the n-th value tied with one left out)."""
    bias = (bias_F.detach().to(torch.float32).contiguous() if bias_F is not None
            else pre_BF.new_zeros(pre_BF.shape[1])).numpy()
    keep_idx = np.empty(n, dtype=np.int64)
    keep_vals = np.empty(n, dtype=np.float32)
    status = _top_n(pre_BF.numpy().reshape(-1), bias, bias_F is not None, cand_N.numpy(), n, np.float32(cut),
                    keep_idx, keep_vals)
    return None if status else (torch.from_numpy(keep_idx), torch.from_numpy(keep_vals))
