"""SAE quality on activation batches: dictionary_learning's `evaluate` keys and formulas, plus extras.

    evaluate_sae(sae, batches)  ->  {l2_loss, l1_loss, l0, frac_variance_explained, cossim, l2_ratio,
                                     relative_reconstruction_bias, frac_alive, mse, dead_latents,
                                     hyperparameters: {n_inputs, context_length}}

Per-batch quantities are averaged over batches, as dictionary_learning does (so use equal batches);
frac_alive and dead_latents count over every evaluated token. The cross-entropy keys (loss_original,
frac_recovered, ...) need the model and belong to the eval stage (`workbench.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workbench.sae import SAE


def frac_variance_explained(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 - sum_d var_b(x - x_hat) / sum_d var_b(x) (unbiased variances, as dictionary_learning)."""
    return 1 - torch.var(x_BD - x_hat_BD, dim=0).sum() / torch.var(x_BD, dim=0).sum()


def batch_metrics(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> dict[str, float]:
    """dictionary_learning's per-batch metrics of one batch, plus mse (mean of (x - x_hat)^2 over
    tokens and dimensions, in the units of x squared)."""
    x_norm_B = torch.linalg.norm(x_BD, dim=-1)
    x_hat_norm_B = torch.linalg.norm(x_hat_BD, dim=-1)
    cossim = ((x_BD / x_norm_B[:, None]) * (x_hat_BD / x_hat_norm_B[:, None])).sum(dim=-1).mean()
    return {
        "l2_loss": torch.linalg.norm(x_BD - x_hat_BD, dim=-1).mean().item(),
        "l1_loss": f_BF.norm(p=1, dim=-1).mean().item(),
        "l0": (f_BF != 0).float().sum(dim=-1).mean().item(),
        "frac_variance_explained": frac_variance_explained(x_BD, x_hat_BD).item(),
        "cossim": cossim.item(),
        "l2_ratio": (x_hat_norm_B / x_norm_B).mean().item(),
        "relative_reconstruction_bias": (x_hat_norm_B.pow(2).mean() / (x_BD * x_hat_BD).sum(dim=-1).mean()).item(),
        "mse": (x_BD - x_hat_BD).pow(2).mean().item(),
    }


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterable[torch.Tensor], use_threshold: bool = True,
                 context_length: int | None = None) -> dict:
    """Evaluate an SAE on batches of raw activations [B, D] (threshold path by default; with
    use_threshold=False, batch top-k over each batch as in training).

    Returns dictionary_learning's keys (means over batches) and the extras `mse` and `dead_latents`
    (latents that never fire on these tokens); hyperparameters.n_inputs counts the tokens.
    """
    device = sae.b_dec.device
    totals: dict[str, float] = {}
    fired_F = torch.zeros(sae.dict_size, dtype=torch.bool, device=device)
    n_batches = n_inputs = 0
    for x_BD in batches:
        x_BD = x_BD.to(device=device, dtype=torch.float32)
        f_BF = sae.encode(x_BD, use_threshold=use_threshold)
        x_hat_BD = sae.decode(f_BF)
        for key, value in batch_metrics(x_BD, x_hat_BD, f_BF).items():
            totals[key] = totals.get(key, 0.0) + value
        fired_F |= (f_BF != 0).any(dim=0)
        n_batches += 1
        n_inputs += x_BD.shape[0]
    if n_batches == 0:
        raise ValueError("evaluate_sae() got no batches")
    out = {key: value / n_batches for key, value in totals.items() if key != "mse"}
    alive = int(fired_F.sum())
    out["frac_alive"] = alive / sae.dict_size
    out["mse"] = totals["mse"] / n_batches
    out["dead_latents"] = sae.dict_size - alive
    out["hyperparameters"] = {"n_inputs": n_inputs, "context_length": context_length}
    return out
