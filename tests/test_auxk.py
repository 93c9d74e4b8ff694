"""The aux-k branch: its selection is exactly the reference's (dictionary_learning's
`relu(pre[:, dead]).topk(D/2, dim=1)` minus zeros) on every route (dead columns gathered, masked in
place, all latents dead, the exact fallback), and the trainer's losses and gradients equal a plain dense
implementation of the reference's."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale

from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, auxk_select
from workbench.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(pre_BF: torch.Tensor, dead_M: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's aux-k code [B, F]: the copy of the dead columns, their per-token topk, scattered."""
    top = torch.relu(pre_BF[:, dead_M]).topk(min(k, dead_M.numel()), dim=1, sorted=False)
    out_BF = torch.zeros_like(pre_BF)
    out_BF[torch.arange(pre_BF.shape[0])[:, None], dead_M[top.indices]] = top.values
    return out_BF


def pre_activations(B: int, F: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, generator=g) * (1 + torch.rand(B, 1, generator=g)) + torch.randn(F, generator=g) - shift


# dead fraction 1.0: every latent (masked route, no column restriction); 0.6: masked in place; 0.1 at
# F 16384: dead columns gathered, then the per-token cut; 0.1 at F 4096 (410 dead): the direct topk
# (the routes of torch's operations; the CPU kernel reads the dead columns of each row);
# shift 3: most dead pre-activations negative, tokens with fewer than k positive entries.
@pytest.mark.usefixtures("selection_path")
@pytest.mark.parametrize("B,F,k,dead_frac,shift", [(256, 4096, 128, 1.0, 0.0), (256, 4096, 128, 0.6, 0.0),
                                                    (128, 16384, 40, 0.1, 0.0), (256, 4096, 128, 0.1, 0.0),
                                                    (256, 4096, 128, 1.0, 3.0), (64, 2048, 16, 0.5, 2.0)])
def test_selection_is_exactly_the_reference_topk_of_the_dead_columns(B, F, k, dead_frac, shift):
    pre_BF = pre_activations(B, F, F + B, shift)
    dead_M = torch.randperm(F, generator=torch.Generator().manual_seed(1))[: int(dead_frac * F)].sort().values
    kept, vals_N = auxk_select(pre_BF, dead_M, k)
    # Selections and copies of the same entries, no arithmetic: exact.
    assert torch.equal(kept.dense(vals_N), dense_reference(pre_BF, dead_M, k))
    flat = kept.rows * F + kept.cols
    assert torch.equal(flat, flat.sort().values)  # row-major, as Kept expects
    assert len(kept) > 0 and bool((vals_N > 0).all())


@pytest.mark.usefixtures("selection_path")
@pytest.mark.parametrize("dead_frac", [1.0, 0.6, 0.1])
def test_selection_with_the_bias_apart_is_the_reference_topk_of_the_biased_values(dead_frac):
    B, F, k = 128, 16384, 64
    pre_BF = pre_activations(B, F, 5)
    bias_F = torch.randn(F, generator=torch.Generator().manual_seed(6)) * 0.5
    dead_M = torch.arange(0, F, int(1 / dead_frac))
    expected_BF = dense_reference(pre_BF + bias_F, dead_M, k)
    kept, vals_N = auxk_select(pre_BF.clone(), dead_M, k, bias_F)
    assert torch.equal(kept.dense(vals_N), expected_BF)


@pytest.mark.usefixtures("selection_path")
def test_a_tie_straddling_a_tokens_cut_is_broken_as_topk_breaks_it():
    B, F, k = 64, 4096, 64
    pre_BF = pre_activations(B, F, 3)
    cut = torch.relu(pre_BF).topk(k, dim=1).values[5, -1]
    pre_BF[5, torch.randperm(F, generator=torch.Generator().manual_seed(4))[:4]] = cut  # 5 values share row 5's cut
    dead_M = torch.arange(F)
    kept, vals_N = auxk_select(pre_BF, dead_M, k)
    assert torch.equal(kept.dense(vals_N), dense_reference(pre_BF, dead_M, k))
    assert torch.bincount(kept.rows, minlength=B).tolist() == [k] * B


def dense_losses(sae, x_BD: torch.Tensor, main_BF: torch.Tensor, dead_M: torch.Tensor, k_aux: int,
                 group_weights: list[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning 0.1.0's two losses on dense codes, autograd through the dense encoder: the
    main code keeps the entries of main_BF's support, the aux-k code is the reference's topk of the dead
    columns; (reconstruction loss, aux-k loss)."""
    pre_BF = torch.relu((x_BD - sae.b_dec) @ sae.W_enc_DF + sae.b_enc_F)
    f_BF = pre_BF * (main_BF > 0)
    if group_weights is None:
        x_hat_BD = f_BF @ sae.W_dec_FD + sae.b_dec
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=-1).mean()
    else:
        bounds, x_hat_BD, losses = sae.group_bounds, sae.b_dec, []
        for g, w in enumerate(group_weights):
            x_hat_BD = x_hat_BD + f_BF[:, bounds[g]:bounds[g + 1]] @ sae.W_dec_FD[bounds[g]:bounds[g + 1]]
            losses.append(w * (x_BD - x_hat_BD).pow(2).sum(dim=-1).mean())
        mse = torch.stack(losses).mean()
    top = pre_BF[:, dead_M].topk(min(k_aux, dead_M.numel()), dim=1, sorted=False)
    f_aux_BF = torch.zeros_like(pre_BF).scatter(-1, dead_M[top.indices], top.values)
    residual_BD = (x_BD - x_hat_BD).detach()
    l2 = (residual_BD - f_aux_BF @ sae.W_dec_FD).pow(2).sum(dim=-1).mean()
    mu_D = residual_BD.mean(dim=0)
    return mse, (l2 / (residual_BD - mu_D).pow(2).sum(dim=-1).mean()).nan_to_num(0.0)


# dead_every 1 with threshold 0: every latent dead, those in the main code too.
@pytest.mark.parametrize("arch,dead_every", [("batchtopk", 1), ("batchtopk", 10), ("matryoshka", 1),
                                             ("matryoshka", 10)])
def test_trainer_losses_and_gradients_equal_the_dense_reference(arch, dead_every):
    torch.manual_seed(0)
    D, F, B, k = 64, 4096, 128, 8
    sae = BatchTopKSAE(D, F, k) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(D, F, k, [1024, 3072])
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc_F.normal_(0, 0.1)
    trainer = Trainer(sae, 10, warmup_steps=1, dead_feature_threshold=0 if dead_every == 1 else 10_000)
    trainer.num_tokens_since_fired[::dead_every] = 10_000
    x_BD = torch.randn(B, D) * 2 + 1
    with torch.no_grad():
        main_BF = sae.encode(x_BD, use_threshold=False)

    kept, _, mse, auxk = trainer._losses(x_BD, k, B)
    (mse + auxk).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    dead_M = torch.nonzero(trainer.num_tokens_since_fired >= trainer.dead_feature_threshold).squeeze(1)
    ref_mse, ref_auxk = dense_losses(sae, x_BD, main_BF, dead_M, D // 2, trainer.group_weights)
    (ref_mse + ref_auxk).backward()

    assert len(kept) == k * B and trainer.dead == dead_M.numel()
    assert (trainer.dead == F) if dead_every == 1 else (0 < trainer.dead <= F // 10 + 1)
    assert_close_to_scale(mse.detach(), ref_mse.detach(), what="reconstruction loss")
    assert_close_to_scale(auxk.detach(), ref_auxk.detach(), what="aux-k loss")
    assert float(ref_auxk.detach()) > 0.05  # the aux-k latents reconstruct part of the residual
    for name, p in sae.named_parameters():
        assert_close_to_scale(ours[name], p.grad, what=name)


def test_no_dead_latent_means_no_auxk_loss():
    trainer = Trainer(BatchTopKSAE(16, 64, 4), 10, warmup_steps=1)
    _, _, mse, auxk = trainer._losses(torch.randn(8, 16), 4, 8)
    assert float(auxk.detach()) == 0.0 and trainer.dead == 0 and float(mse.detach()) > 0
