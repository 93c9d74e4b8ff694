"""The sink rule: which tokens an SAE sees. The attention-sink filter, first-token removal, and
`keep_mask` (kept = valid, not a sink, not the first token), with the default multiple and the drop
reasons the cache stores.

Collection, re-filtering at read time (the cache reader), evaluation and inference with a trained SAE
all call these functions, so a token is a sink, and is kept, in exactly the same cases everywhere.

The rule (dictionary_learning PR #52): per forward batch and per layer, a token is a sink when
    ||h|| > multiple * median(||h||)
with one median over the batch. Norms are taken in float32 (the reference takes them in the model
dtype; for bf16 models a token within bf16 rounding of the boundary can differ). The median is
torch.median's, the lower middle value, as in the reference. `median_over="real"` takes it over the
real (non-padding) tokens; `median_over="all"` over every position, padding included, which is the
reference's rule exactly and differs from "real" only for padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.config import (
    DEFAULT_SINK_MULTIPLE,  # defined beside the recipe defaults: config loads no torch
)

FIRST_TOKEN = 1  # drop reasons stored in the cache (0 = kept)
SINK = 2


def token_norms(acts_BLD: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token's activation in float32: [..., D] -> [...]."""
    return acts_BLD.float().norm(dim=-1)


def batch_median(norms_BL: torch.Tensor, valid_BL: torch.Tensor | None = None, median_over: str = "real") -> torch.Tensor:
    """The batch's median norm (a 0-d float32 tensor). valid_BL marks real tokens (False = padding)."""
    if median_over == "all" or valid_BL is None:
        return norms_BL.flatten().median()
    if median_over != "real":
        raise ValueError(f"median_over must be 'real' or 'all' (got {median_over!r})")
    return norms_BL[valid_BL].median()


def is_sink(norms: torch.Tensor, median: torch.Tensor, multiple: float) -> torch.Tensor:
    """True where norm > multiple * median (strict). Works on any shape; median broadcasts."""
    return norms > median * multiple


def first_token_mask(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """True at the tokens first-token removal drops: every BOS token when the tokenizer has one,
    else the first non-padding token of each row (Qwen has no BOS)."""
    valid_BL = attention_mask_BL.bool()
    if bos_token_id is not None:
        return (input_ids_BL == bos_token_id) & valid_BL
    return (valid_BL.long().cumsum(dim=1) == 1) & valid_BL


def keep_mask(valid_BL: torch.Tensor | None, sink_BL: torch.Tensor, first_BL: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens an SAE sees: kept = valid (not padding), not a sink, not the first token. Boolean
    masks of one shape; valid_BL None: every token is real (a cache stores no padding); first_BL None:
    first-token removal is off."""
    keep_BL = ~sink_BL if valid_BL is None else valid_BL & ~sink_BL
    return keep_BL if first_BL is None else keep_BL & ~first_BL


def drop_reasons(keep_BL: torch.Tensor, first_BL: torch.Tensor) -> torch.Tensor:
    """Why each real token is dropped, as the cache stores it (uint8): 0 kept, FIRST_TOKEN, else SINK."""
    return torch.where(keep_BL, 0, torch.where(first_BL, FIRST_TOKEN, SINK)).to(torch.uint8)


@dataclass
class SinkFilter:
    """The filter's decision for one batch: keep_BL (valid, not a sink), the norms and the median."""

    keep_BL: torch.Tensor
    sink_BL: torch.Tensor
    norms_BL: torch.Tensor
    median: torch.Tensor


def sink_filter(
    acts_BLD: torch.Tensor,
    multiple: float | None = DEFAULT_SINK_MULTIPLE,
    valid_BL: torch.Tensor | None = None,
    median_over: str = "real",
) -> SinkFilter:
    """Apply the sink filter to one batch of activations [B, L, D] (or [N, D] treated as one batch).

    multiple=None turns the filter off (nothing is a sink). valid_BL marks real tokens; padding is
    never kept. Use it at inference exactly as collection did:

        flt = sink_filter(resid_BLD, multiple=10, valid_BL=attention_mask.bool())
        f_BLF = sae.encode(resid_BLD) * flt.keep_BL[..., None]     # sink tokens encode to zero
    """
    norms_BL = token_norms(acts_BLD)
    if valid_BL is None:
        valid_BL = torch.ones_like(norms_BL, dtype=torch.bool)
    valid_BL = valid_BL.bool()
    # The median is computed even with the filter off: the cache stores it so the filter can be
    # applied later, at read time, with the same result as at collection.
    if not bool(valid_BL.any()):
        median = norms_BL.new_tensor(float("nan"))
    else:
        median = batch_median(norms_BL, valid_BL, median_over)
    if multiple is None:
        sink_BL = torch.zeros_like(valid_BL)
    else:
        sink_BL = is_sink(norms_BL, median, multiple) & valid_BL
    return SinkFilter(keep_BL=keep_mask(valid_BL, sink_BL), sink_BL=sink_BL, norms_BL=norms_BL, median=median)
