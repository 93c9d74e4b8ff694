"""The features pass: one streaming pass over a cache layer with an SAE, and features.json.

For every latent it gathers, from the tokens the SAE was trained on (the *kept* tokens):
firing count and frequency, mean activation, a log-binned activation histogram and the top N
activating tokens; and from the sink tokens the filter dropped (the cache keeps them): how often and how
strongly the latent would fire there.

The encode is the SAE's own `encode` as used at inference, one token at a time: for BatchTopK and
Matryoshka SAEs the JumpReLU rule f = pre * (pre > threshold) at the threshold `workbench threshold`
derived (never the batch top-k of training, which depends on the batch); SAELens jumprelu, topk and
standard SAEs encode as SAELens does. An SAE whose threshold was never set (-1) is refused.

Which tokens. The pass reads every stored token of the layer except the first tokens of rows when
collection dropped them (those are neither training tokens nor sinks), once, in collection order. A
token is *kept* by the SAE's own filter: the cache's decision, unless the SAE records another
`sink_multiple`, which is then re-applied to the stored norms and batch medians (the rule
`workbench threshold` follows). Every other token read is a *sink*. Examples come from kept tokens only.

Cost. One pass over the activations, a batch of rows at a time; the running state is O(F) tensors:
the top N [N, F] values and token indices, a histogram [F, H] and a few [F] sums. Per batch, the
nonzero latents give counts, sums and the histogram; only the latents where some activation beats
the running N-th best value are merged (`merge_top`), which soon is a few a batch. The
contexts are read afterwards from the per-token ids of the shards that hold examples.

features.json (schema "workbench-features", version 1)::

    {"schema": "workbench-features", "version": 1,
     "sae": {"folder", "format", "kind", "layer", "d_model", "width",
             "encode": how the latents were computed (see above)},
     "cache": {"path", "model", "layer",
               "tokens": tokens read (kept + sinks), "kept_tokens", "sink_tokens",
               "first_tokens_skipped": first tokens of rows, not read,
               "sink_multiple": the multiple that decided kept vs sink (null: no filter),
               "filter_source": "cache" (as collected) or "sae config" (the SAE's own multiple)},
     "settings": {"top": N, "window": W, "histogram_bins_per_octave": 4},
     "sinks": {"tokens": sink tokens read,
               "by_token": [{"token_id", "token", "count"}]   the 10 most frequent sink tokens},
     "effects": null, or {"model": the model name, "unembedding": how (see effects.py), "top": n},
     "latents": [   one per latent, in order, "id" = its index
        {"id": i,
         "fires": kept tokens where f_i > 0, "frequency": fires / kept_tokens,
         "mean_activation": sum of f_i over kept tokens / kept_tokens,
         "mean_when_active": sum / fires (null when it never fires),
         "max_activation": largest f_i on a kept token (0 when it never fires),
         "histogram": {"edges": [e_0, ..., e_B], "counts": [c_0, ..., c_B-1]}: the kept tokens where it
             fires, by activation; bin j holds e_j <= f < e_j+1, edges 2^(m/4) (4 bins an octave) over the
             latent's own range; values below 2^-20 or from 2^20 up are counted in the end bins; the
             counts sum to "fires",
         "examples": up to N (fewer when it fires on fewer kept tokens), by activation, largest first:
             [{"sequence", "position", "activation", "token_id", "token",
               "context": {"ids": [...], "tokens": [...], "index": where the example is in them}}],
             the context being up to W tokens either side in the same row, decoded with the model's
             tokenizer (one string a token),
         "sink": {"fires": sink tokens where f_i > 0, "max_activation": largest f_i on a sink (0: none),
                  "max_at": {"sequence", "position", "token_id", "token"} of that sink, or null,
                  "dominates": max_activation on sinks > max_activation on kept tokens},
         "effects": {"positive": [{"token_id", "token", "logit"}], "negative": [...]} (with a model)}]}

"dominates" flags a latent that the sink filter protects: on the dropped sink tokens it would fire
harder than on any token it was trained on (a latent that never fires on kept tokens but fires on a
sink is flagged too). Reading the examples of such a latent without the filter would show sinks only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from workbench.cache import ActivationCache
from workbench.sink import FIRST_TOKEN, is_sink, keep_mask

SCHEMA = "workbench-features"
SCHEMA_VERSION = 1
BINS_PER_OCTAVE = 4
LOG2_RANGE = (-20, 20)  # histogram range in octaves: edges 2^-20 .. 2^20, out-of-range values in the end bins
NUM_BINS = (LOG2_RANGE[1] - LOG2_RANGE[0]) * BINS_PER_OCTAVE
BATCH_BYTES = 16 << 20  # rows a batch: about this many bytes of latents [B, F] float32 (the encode makes ~5 such)
MAX_BATCH = 4096
WINDOW_BYTES = 32 << 20  # the cache reader's window (its default, 256 MiB, is for shuffled training reads)
SINK_TOKENS_LISTED = 10


@dataclass
class LatentStats:
    """What the pass gathers, for F latents (tensors on the CPU). Token indices are global stored-row
    indices of the layer: shard offset + row in the shard (`token_rows` maps them back)."""

    kept_tokens: int
    sink_tokens: int
    first_tokens_skipped: int
    fires_F: torch.Tensor  # int64
    sum_F: torch.Tensor  # float64
    hist_FH: torch.Tensor  # int64 [F, NUM_BINS]
    top_val_NF: torch.Tensor  # float32, descending in each column; 0 where there is no example
    top_row_NF: torch.Tensor  # int64, -1 where there is no example
    sink_fires_F: torch.Tensor
    sink_max_F: torch.Tensor
    sink_row_F: torch.Tensor  # int64, -1 where it never fires on a sink
    sink_token_counts: dict[int, int]


def batch_rows(width: int) -> int:
    """Tokens a batch for an SAE of `width` latents (about BATCH_BYTES of latents, at most MAX_BATCH)."""
    return max(64, min(MAX_BATCH, BATCH_BYTES // (4 * width)))


def shard_offsets(cache: ActivationCache) -> np.ndarray:
    """The global row index of each shard's first row, and the total, [shards + 1]."""
    return np.concatenate([[0], np.cumsum([int(s["num_tokens"]) for s in cache.manifest["shards"]])]).astype(np.int64)


def training_tokens(cache: ActivationCache, layer: int, shard: int, refilter: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, first) [rows] for a shard: the SAE's training tokens, and the first tokens of rows.

    keep is the cache's decision, or with `refilter` the sink rule re-applied with that multiple to the
    stored norms and batch medians through `sink.keep_mask`, as the reader re-filters (first tokens stay
    dropped when collection dropped them)."""
    g = f"layer_{layer}"
    first = cache.read_vector(shard, f"{g}/drop_reason") == FIRST_TOKEN
    if refilter is None:
        return cache.read_vector(shard, f"{g}/kept"), first
    batch = cache.read_vector(shard, "tokens/batch") - cache.first_batch(shard)
    medians = cache.read_vector(shard, f"{g}/batch_median")[batch]
    sink = is_sink(torch.from_numpy(cache.read_vector(shard, f"{g}/norm")), torch.from_numpy(medians), refilter)
    # every stored token is real (padding is never stored): no valid mask
    keep = keep_mask(None, sink, torch.from_numpy(first) if cache.drop_first_token else None)
    return keep.numpy(), first


class _Rows:
    """The per-token facts of the rows the pass reads, in the order the reader yields them, taken a
    batch at a time across shard boundaries: global row index, kept flag, token id."""

    def __init__(self, cache: ActivationCache, layer: int, refilter: float | None):
        self.parts = self._shards(cache, layer, refilter)
        self.part: tuple[np.ndarray, ...] = (np.zeros(0, np.int64),) * 3
        self.at = 0  # rows of self.part already taken
        self.first_tokens_skipped = 0

    def _shards(self, cache: ActivationCache, layer: int, refilter: float | None) -> Iterator[tuple[np.ndarray, ...]]:
        offsets = shard_offsets(cache)
        for shard in range(len(cache.shards)):
            keep, first = training_tokens(cache, layer, shard, refilter)
            read = ~first if cache.drop_first_token else np.ones_like(first)
            self.first_tokens_skipped += int((~read).sum())
            rows = np.flatnonzero(read)
            yield rows + offsets[shard], keep[rows], cache.read_vector(shard, "tokens/token_id")[rows]

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        """The next n rows' (global row, kept, token id)."""
        pieces = []
        while n > 0:
            if self.at == len(self.part[0]):
                self.part, self.at = next(self.parts), 0
                continue
            k = min(n, len(self.part[0]) - self.at)
            pieces.append(tuple(a[self.at: self.at + k] for a in self.part))
            self.at, n = self.at + k, n - k
        return tuple(np.concatenate([p[i] for p in pieces]) for i in range(3))

    def finished(self) -> bool:
        return self.at == len(self.part[0]) and all(len(part[0]) == 0 for part in self.parts)


def all_but_first_tokens(cache: ActivationCache, layer: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Every stored token of a layer except the first tokens of rows collection dropped, float32 [B, D], in
    collection order: the reader with an infinite sink multiple (no norm exceeds it), so that the sinks
    come too."""
    return cache.batches(layer, batch_size, shuffle=False, split="all", drop_last=False, sink_multiple=math.inf,
                         window_bytes=WINDOW_BYTES)


def merge_top(top_val_NF: torch.Tensor, top_row_NF: torch.Tensor, v_E: torch.Tensor, c_E: torch.Tensor,
              row_E: torch.Tensor) -> None:
    """Merge candidate activations (value, latent, row) [E] into the running top N of their latents, in place.

    Only the latents the candidates hit are touched: their N running entries and the candidates are
    sorted by latent, then by value descending (running entries first among equal values), and the first
    N of each latent are kept. Each latent has N running entries (placeholders 0 / -1 included), so exactly
    N come back: O((N C + E) log) per batch, where a dense topk over the batch would read all of [B, C]."""
    N, F = top_val_NF.shape
    hit_F = torch.zeros(F, dtype=torch.bool)
    hit_F[c_E] = True
    cols_C = hit_F.nonzero().squeeze(1)
    C = len(cols_C)
    vals = torch.cat([top_val_NF[:, cols_C].flatten(), v_E])
    cols = torch.cat([cols_C.repeat(N), c_E])
    rows = torch.cat([top_row_NF[:, cols_C].flatten(), row_E])
    order = vals.argsort(descending=True, stable=True)
    order = order[cols[order].argsort(stable=True)]
    counts_C = torch.bincount(cols, minlength=F)[cols_C]
    rank = torch.arange(len(order)) - torch.repeat_interleave(counts_C.cumsum(0) - counts_C, counts_C)
    first = order[rank < N]  # C latents in ascending order, N entries each, largest first
    top_val_NF[:, cols_C] = vals[first].view(C, N).T
    top_row_NF[:, cols_C] = rows[first].view(C, N).T


@torch.no_grad()
def feature_pass(sae: torch.nn.Module, cache: ActivationCache, layer: int, refilter: float | None, top: int,
                 width: int) -> LatentStats:
    """One pass over `layer` of `cache` with `sae.encode` (see the module docstring)."""
    N, F = top, width
    dtype = next(sae.parameters()).dtype
    fires_F = torch.zeros(F, dtype=torch.int64)
    sum_F = torch.zeros(F, dtype=torch.float64)
    hist_FH = torch.zeros(F * NUM_BINS, dtype=torch.int64)
    top_val_NF = torch.zeros(N, F)
    top_row_NF = torch.full((N, F), -1, dtype=torch.int64)
    sink_fires_F = torch.zeros(F, dtype=torch.int64)
    sink_max_F = torch.zeros(F)
    sink_row_F = torch.full((F,), -1, dtype=torch.int64)
    sink_ids: list[np.ndarray] = []
    kept_tokens = sink_tokens = 0
    rows = _Rows(cache, layer, refilter)
    for x_BD in all_but_first_tokens(cache, layer, batch_rows(F)):
        row_np, keep_np, tid_np = rows.take(x_BD.shape[0])
        row_B = torch.from_numpy(row_np)
        f_BF = sae.encode(x_BD.to(dtype)).float()
        kept_tokens += int(keep_np.sum())
        if not keep_np.all():
            sink_S = torch.from_numpy(np.flatnonzero(~keep_np))
            f_SF = f_BF.index_select(0, sink_S)
            sink_tokens += len(sink_S)
            sink_ids.append(tid_np[~keep_np])
            sink_fires_F += (f_SF > 0).sum(0)
            best_F, at_F = f_SF.max(0)
            better_F = best_F > sink_max_F
            sink_max_F = torch.where(better_F, best_F, sink_max_F)
            sink_row_F = torch.where(better_F, row_B[sink_S][at_F], sink_row_F)
            f_BF.index_fill_(0, sink_S, 0)  # from here on the batch holds kept tokens only
        r_Z, c_Z = f_BF.nonzero(as_tuple=True)  # Z: the nonzero (positive) activations of the batch
        v_Z = f_BF[r_Z, c_Z]
        fires_F += torch.bincount(c_Z, minlength=F)
        sum_F.index_add_(0, c_Z, v_Z.double())
        bins_Z = (torch.log2(v_Z) * BINS_PER_OCTAVE).floor_().long() - LOG2_RANGE[0] * BINS_PER_OCTAVE
        hist_FH.index_add_(0, c_Z * NUM_BINS + bins_Z.clamp_(0, NUM_BINS - 1), torch.ones_like(c_Z))
        better_Z = v_Z > top_val_NF[N - 1, c_Z]  # only these can enter their latent's top N
        if bool(better_Z.any()):
            merge_top(top_val_NF, top_row_NF, v_Z[better_Z], c_Z[better_Z], row_B[r_Z[better_Z]])
    if not rows.finished():
        raise RuntimeError("the cache reader yielded fewer rows than its per-token vectors hold")
    counts = np.bincount(np.concatenate(sink_ids)) if sink_ids else np.zeros(0, np.int64)
    return LatentStats(kept_tokens=kept_tokens, sink_tokens=sink_tokens, first_tokens_skipped=rows.first_tokens_skipped,
                       fires_F=fires_F, sum_F=sum_F, hist_FH=hist_FH.view(F, NUM_BINS), top_val_NF=top_val_NF,
                       top_row_NF=top_row_NF, sink_fires_F=sink_fires_F, sink_max_F=sink_max_F, sink_row_F=sink_row_F,
                       sink_token_counts={int(t): int(c) for t, c in enumerate(counts) if c})


@dataclass
class TokenRow:
    """One stored token and its context window: the ids around it in its row, and its index in them."""

    sequence: int
    position: int
    token_id: int
    context_ids: list[int]
    index: int


def token_rows(cache: ActivationCache, rows: np.ndarray, window: int) -> dict[int, TokenRow]:
    """Global stored-row indices -> their tokens, with up to `window` tokens either side in the same row
    (rows of a sequence are stored together, in order, within one shard)."""
    offsets = shard_offsets(cache)
    rows = np.unique(rows[rows >= 0])
    out: dict[int, TokenRow] = {}
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    for shard in np.unique(shard_of).tolist():
        mine = rows[shard_of == shard]
        local = mine - offsets[shard]
        seq = cache.read_vector(shard, "tokens/sequence")
        pos = cache.read_vector(shard, "tokens/position")
        tid = cache.read_vector(shard, "tokens/token_id")
        around_EW = local[:, None] + np.arange(-window, window + 1)[None, :]
        inside_EW = (around_EW >= 0) & (around_EW < len(seq))
        clipped_EW = np.clip(around_EW, 0, len(seq) - 1)
        same_EW = inside_EW & (seq[clipped_EW] == seq[local][:, None])
        for e, g in enumerate(mine.tolist()):
            r = int(local[e])
            ctx = clipped_EW[e][same_EW[e]]
            out[g] = TokenRow(sequence=int(seq[r]), position=int(pos[r]), token_id=int(tid[r]),
                              context_ids=tid[ctx].tolist(), index=int(np.searchsorted(ctx, r)))
    return out


class TokenText:
    """Token ids as text with the model's tokenizer: one string a token, decoded once per id. A context
    holding a token that is part of a multi-byte character (it decodes alone to U+FFFD) is decoded
    incrementally instead, so the character shows at the token that completes it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def one(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self._decode([token_id])
        return self.cache[token_id]

    def many(self, ids: list[int]) -> list[str]:
        texts = [self.one(t) for t in ids]
        if not any("\ufffd" in t for t in texts):
            return texts
        out, before = [], ""
        for i in range(len(ids)):
            now = self._decode(ids[: i + 1])
            out.append(now[len(before):] if now.startswith(before) else texts[i])
            before = now
        return out


def histogram(counts_H: np.ndarray) -> dict:
    """A latent's histogram trimmed to the bins it uses: {"edges", "counts"} (see the module docstring)."""
    used = np.flatnonzero(counts_H)
    if not len(used):
        return {"edges": [], "counts": []}
    lo, hi = int(used[0]), int(used[-1]) + 1
    first = LOG2_RANGE[0] * BINS_PER_OCTAVE
    return {"edges": [2.0 ** ((first + j) / BINS_PER_OCTAVE) for j in range(lo, hi + 1)],
            "counts": counts_H[lo:hi].tolist()}


def latent_records(stats: LatentStats, tokens: dict[int, TokenRow], text: TokenText) -> list[dict]:
    """The "latents" list of features.json from the pass and the tokens it points at."""
    top_val = stats.top_val_NF.numpy()
    top_row = stats.top_row_NF.numpy()
    fires, sums, hist = stats.fires_F.numpy(), stats.sum_F.numpy(), stats.hist_FH.numpy()
    sink_fires, sink_max, sink_row = stats.sink_fires_F.numpy(), stats.sink_max_F.numpy(), stats.sink_row_F.numpy()
    kept = max(stats.kept_tokens, 1)
    out = []
    for i in range(len(fires)):
        order = sorted((j for j in range(top_val.shape[0]) if top_val[j, i] > 0),
                       key=lambda j: (-top_val[j, i], top_row[j, i]))
        examples = []
        for j in order:
            t = tokens[int(top_row[j, i])]
            examples.append({"sequence": t.sequence, "position": t.position, "activation": float(top_val[j, i]),
                             "token_id": t.token_id, "token": text.one(t.token_id),
                             "context": {"ids": t.context_ids, "tokens": text.many(t.context_ids), "index": t.index}})
        max_kept = float(top_val[0, i])
        at = tokens.get(int(sink_row[i]))
        out.append({
            "id": i, "fires": int(fires[i]), "frequency": int(fires[i]) / kept,
            "mean_activation": float(sums[i]) / kept,
            "mean_when_active": float(sums[i]) / int(fires[i]) if fires[i] else None,
            "max_activation": max_kept, "histogram": histogram(hist[i]), "examples": examples,
            "sink": {"fires": int(sink_fires[i]), "max_activation": float(sink_max[i]),
                     "max_at": None if at is None else {"sequence": at.sequence, "position": at.position,
                                                        "token_id": at.token_id, "token": text.one(at.token_id)},
                     "dominates": bool(sink_max[i] > max_kept)}})
    return out


def sink_summary(stats: LatentStats, text: TokenText) -> dict:
    ranked = sorted(stats.sink_token_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:SINK_TOKENS_LISTED]
    return {"tokens": stats.sink_tokens,
            "by_token": [{"token_id": t, "token": text.one(t), "count": c} for t, c in ranked]}
