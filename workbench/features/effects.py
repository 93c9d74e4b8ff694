"""Output-token effects: each latent's decoder direction read through the model's unembedding.

    logit_FV = (d_FD * g_D) @ W_U_VD.T

d_i is what one unit of latent i adds to the reconstruction (the decoder row; divided by its norm for a
SAELens SAE that rescales activations by it), W_U the output embedding (lm_head), and g the final norm's
per-dimension gain, folded in as TransformerLens' `fold_ln` does (the logit tables of sae-dashboard
read the folded W_U): the residual stream reaches the unembedding through that norm, so a direction's
effect on the logits is scaled per dimension by g. The norm's division by the token's RMS is a positive
scalar per token, which changes no ranking, and is left out: the figures are logits per unit of
direction before it. g is the norm applied to a vector of ones (RMS 1), which gives the gain whatever
the norm's convention (Qwen3 multiplies by its weight, Gemma3 by 1 + weight); a model without a final
norm on its decoder gets g = 1. Gemma3's final logit soft-capping is monotonic and left out too.
"""

from __future__ import annotations

import torch

from workbench.features.compute import TokenText

BLOCK_LATENTS = 256  # latents per [block, V] logit product
UNEMBEDDING = "W_U @ (g * d_i): the final norm's gain g folded in, its 1/RMS scale left out"


def decoder_directions(sae: torch.nn.Module) -> torch.Tensor:
    """d_FD: what one unit of each latent adds to the reconstruction."""
    W_dec_FD = sae.W_dec_FD if hasattr(sae, "W_dec_FD") else sae.W_dec
    if getattr(sae, "rescale_acts_by_decoder_norm", False):
        W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True)
    return W_dec_FD.detach().float()


def final_norm_gain(model: torch.nn.Module, d_model: int) -> torch.Tensor:
    """g_D: the decoder's final norm applied to ones (see the module docstring); ones without one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    param = next(model.parameters())
    if norm is None:
        return torch.ones(d_model)
    with torch.no_grad():
        return norm(torch.ones(1, d_model, dtype=param.dtype, device=param.device)).float().cpu()[0]


@torch.no_grad()
def output_effects(sae: torch.nn.Module, model: torch.nn.Module, text: TokenText, top: int) -> list[dict]:
    """Per latent {"positive": [...], "negative": [...]}: the `top` tokens with the largest and the smallest
    logit of its direction, each {"token_id", "token", "logit"}."""
    W_U_VD = model.get_output_embeddings().weight.detach()
    d_FD = decoder_directions(sae)
    gained_FD = d_FD * final_norm_gain(model, d_FD.shape[1])
    out = []
    for start in range(0, d_FD.shape[0], BLOCK_LATENTS):
        logit_bV = (gained_FD[start: start + BLOCK_LATENTS].to(W_U_VD) @ W_U_VD.T).float().cpu()
        n = min(top, logit_bV.shape[1])
        hi, lo = logit_bV.topk(n, dim=1), logit_bV.topk(n, dim=1, largest=False)
        for b in range(logit_bV.shape[0]):
            out.append({name: [{"token_id": int(t), "token": text.one(int(t)), "logit": float(v)}
                               for v, t in zip(res.values[b].tolist(), res.indices[b].tolist(), strict=True)]
                        for name, res in (("positive", hi), ("negative", lo))})
    return out
