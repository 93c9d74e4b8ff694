"""Using a trained SAE on new activations with the filter it was trained under.

The SAEs never saw attention-sink tokens (norm > multiple x the batch median) or first tokens: the
collection stage dropped them. Encoding them anyway gives latents far outside anything seen in
training, so at inference they must be filtered the same way. `encode_filtered` does that with
`workbench.sink.sink_filter` and `keep_mask`, the functions collection itself uses:

    sae = load_sae("export/blocks.2.hook_resid_post")              # any format
    settings = filter_settings("export/blocks.2.hook_resid_post")  # what training used
    f_BLF, keep_BL = encode_filtered(sae, resid_BLD, valid_BL=attention_mask.bool(),
                                     first_token_BL=first_token_mask(input_ids, attention_mask, bos_id),
                                     **settings)
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.config import CollectConfig
from workbench.provenance import recorded_filter
from workbench.sink import DEFAULT_SINK_MULTIPLE, keep_mask, sink_filter


def encode_filtered(sae: torch.nn.Module, resid_BLD: torch.Tensor, multiple: float | None = DEFAULT_SINK_MULTIPLE,
                    valid_BL: torch.Tensor | None = None, median_over: str = "real",
                    first_token_BL: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [B, L, F] of residual activations [B, L, D], zero at sink tokens, padding (valid_BL False)
    and first tokens (first_token_BL True); and keep_BL, the tokens that were encoded.

    `sae` is anything with encode([N, D]) -> [N, F] that encodes each token on its own (the JumpReLU
    rule: workbench modules, dictionary_learning's BatchTopKSAE, SAELens' SAEs). One median per call,
    as in collection: pass one forward batch at a time. multiple=None turns the sink filter off."""
    flt = sink_filter(resid_BLD, multiple=multiple, valid_BL=valid_BL, median_over=median_over)
    keep_BL = keep_mask(None if valid_BL is None else valid_BL.bool(), flt.sink_BL,
                        None if first_token_BL is None else first_token_BL.bool())
    return encode_kept(sae, resid_BLD, keep_BL), keep_BL


def encode_kept(sae: torch.nn.Module, resid_BLD: torch.Tensor, keep_BL: torch.Tensor) -> torch.Tensor:
    """Latents [B, L, F]: sae.encode of the tokens keep_BL marks, zero everywhere else (encode_filtered's
    second half, for a caller that already has the keep mask)."""
    f_NF = sae.encode(resid_BLD[keep_BL])
    f_BLF = f_NF.new_zeros((*keep_BL.shape, f_NF.shape[-1]))
    f_BLF[keep_BL] = f_NF
    return f_BLF


def filter_settings(folder: str | Path) -> dict:
    """The filter an SAE folder (either format) records it was trained with, as encode_filtered's
    keyword arguments: {"multiple", "median_over"}. An SAE that records nothing gets the defaults."""
    from workbench.formats.convert import read_weights

    settings = recorded_filter(read_weights(folder).info.provenance, CollectConfig())
    return {"multiple": settings["sink_multiple"], "median_over": settings["sink_median"]}
