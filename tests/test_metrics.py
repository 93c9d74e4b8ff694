"""metrics.evaluate_sae on SAEs whose answers are known. (Its agreement with dictionary_learning's own
evaluate() on trained SAEs is proven in tests/test_train.py, against the reference in a subprocess.)"""

from __future__ import annotations

import pytest
import torch

from workbench.metrics import evaluate_sae, frac_variance_explained
from workbench.sae import BatchTopKSAE


def signed_identity_sae(D: int) -> BatchTopKSAE:
    """Latents relu(x) and relu(-x), decoded back: x_hat == x exactly (F = 2D, L0 = D a token)."""
    sae = BatchTopKSAE(D, 2 * D, k=D)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_dec.zero_()
        sae.threshold.fill_(0.0)
    return sae


def test_a_perfect_sae_scores_perfectly():
    torch.manual_seed(0)
    D = 8
    batches = [torch.randn(32, D) for _ in range(3)]
    out = evaluate_sae(signed_identity_sae(D), batches, context_length=128)
    assert out["l2_loss"] == pytest.approx(0, abs=1e-6) and out["mse"] == pytest.approx(0, abs=1e-12)
    assert out["frac_variance_explained"] == pytest.approx(1) and out["cossim"] == pytest.approx(1)
    assert out["l2_ratio"] == pytest.approx(1) and out["relative_reconstruction_bias"] == pytest.approx(1)
    assert out["l0"] == D
    assert out["l1_loss"] == pytest.approx(sum(b.abs().sum(1).mean().item() for b in batches) / 3)
    assert out["frac_alive"] == 1.0 and out["dead_latents"] == 0
    assert out["hyperparameters"] == {"n_inputs": 96, "context_length": 128}
    assert list(out)[:8] == ["l2_loss", "l1_loss", "l0", "frac_variance_explained", "cossim", "l2_ratio",
                             "relative_reconstruction_bias", "frac_alive"]


def test_latents_that_never_fire_are_counted_over_all_batches():
    D = 4
    sae = signed_identity_sae(D)
    positive = [torch.rand(16, D) + 0.1, torch.rand(16, D) + 0.1]  # relu(-x) never fires
    out = evaluate_sae(sae, positive)
    assert out["dead_latents"] == D and out["frac_alive"] == 0.5
    out = evaluate_sae(sae, [*positive, -positive[0]])  # a later batch wakes them up
    assert out["dead_latents"] == 0


def test_batch_topk_path_and_a_zero_reconstruction():
    D = 4
    sae = signed_identity_sae(D)
    x = torch.randn(16, D)
    out = evaluate_sae(sae, [x], use_threshold=False)
    assert out["l0"] == D  # k = D of the 2D latents a token, on average over the batch
    with torch.no_grad():
        sae.decoder.weight.zero_()
        sae.b_dec.copy_(x.mean(0))  # reconstructs every token as the mean: explains no variance
    out = evaluate_sae(sae, [x])
    assert out["frac_variance_explained"] == pytest.approx(0, abs=1e-6)
    assert out["mse"] == pytest.approx((x - x.mean(0)).pow(2).mean().item())
    assert frac_variance_explained(x, x) == 1.0


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        evaluate_sae(signed_identity_sae(2), [])
