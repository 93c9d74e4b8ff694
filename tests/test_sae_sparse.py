"""The SAE modules' state-dict contract, and the sparse training path: the batch top-k selection is
exactly torch.topk's index set (fast path, fallback, ties, data-parallel shares), and the sparse
encoder/decoder products give the dense products' values and gradients."""

from __future__ import annotations

import threading

import pytest
import torch

from workbench.sae import (
    BatchTopKSAE,
    Kept,
    MatryoshkaBatchTopKSAE,
    batch_topk,
    batch_topk_select,
    decode_kept,
    encode_kept,
    matryoshka_group_sizes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_dicts_follow_the_dictionary_learning_contract():
    D, F = 16, 64
    btk = BatchTopKSAE(D, F, 4).state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in btk.items()} == {
        "k": ((), torch.int32), "threshold": ((), torch.float32), "decoder.weight": ((D, F), torch.float32),
        "encoder.weight": ((F, D), torch.float32), "encoder.bias": ((F,), torch.float32), "b_dec": ((D,), torch.float32)}
    mat = MatryoshkaBatchTopKSAE(D, F, 4, matryoshka_group_sizes(F, [0.25, 0.75])).state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in mat.items()} == {
        "k": ((), torch.int32), "threshold": ((), torch.float32), "group_sizes": ((2,), torch.int64),
        "W_enc": ((D, F), torch.float32), "b_enc": ((F,), torch.float32), "W_dec": ((F, D), torch.float32),
        "b_dec": ((D,), torch.float32)}
    assert mat["group_sizes"].tolist() == [16, 48]
    assert float(btk["threshold"]) == -1.0
    torch.testing.assert_close(btk["decoder.weight"].norm(dim=0), torch.ones(F))


def _topk_set(pre_BF: torch.Tensor, n: int) -> set[int]:
    top = pre_BF.flatten().topk(n, sorted=False)
    return set(top.indices[top.values > 0].tolist())


@pytest.mark.usefixtures("selection_path")
@pytest.mark.parametrize("B,F,k,density", [(256, 4096, 32, 1.0), (1024, 512, 8, 1.0), (64, 256, 8, 1.0),
                                           (128, 1024, 16, 0.05), (333, 777, 5, 0.5)])
def test_selection_is_exactly_the_full_topk_index_set(B, F, k, density):
    g = torch.Generator().manual_seed(B + F)
    pre_BF = torch.relu(torch.randn(B, F, generator=g) + torch.randn(F, generator=g))
    pre_BF *= torch.rand(B, F, generator=g) < density  # density 0.05: fewer positive entries than k*B
    kept, vals_N = batch_topk_select(pre_BF, k * B)
    flat_idx = kept.rows * F + kept.cols
    assert set(flat_idx.tolist()) == _topk_set(pre_BF, k * B)
    assert torch.equal(flat_idx, flat_idx.sort().values)  # row-major
    # Selections and copies of the same entries, no arithmetic: exact.
    assert torch.equal(vals_N, pre_BF[kept.rows, kept.cols])
    assert torch.equal(batch_topk(pre_BF, k), kept.dense(vals_N))


@pytest.mark.usefixtures("selection_path")
@pytest.mark.parametrize("B,F,k", [(256, 4096, 32), (128, 1024, 16), (64, 256, 8), (100, 3000, 16)])
def test_selection_with_the_bias_apart_is_the_topk_of_the_biased_values(B, F, k):
    g = torch.Generator().manual_seed(B * F)
    product_BF = torch.randn(B, F, generator=g)
    bias_F = torch.randn(F, generator=g) * 0.5  # latents' cuts differ: the compare runs against cut - bias
    kept, vals_N = batch_topk_select(product_BF, k * B, bias_F=bias_F)
    pre_BF = product_BF + bias_F
    assert set((kept.rows * F + kept.cols).tolist()) == _topk_set(pre_BF, k * B)
    assert torch.equal(vals_N, pre_BF[kept.rows, kept.cols])  # the same one addition: exact
    # Values on a 1/1024 grid, biases on a 1/8 grid: every sum is exact, and ties straddle the cut.
    product_BF, bias_F = (product_BF * 1024).round() / 1024, (bias_F * 8).round() / 8
    cut = torch.relu(product_BF + bias_F).flatten().topk(k * B).values[-1]
    product_BF[:2, :] = (cut - bias_F).expand(2, F)  # 2 * F more entries at the cut: a tie straddles it
    kept, vals_N = batch_topk_select(product_BF, k * B, bias_F=bias_F)
    pre_BF = product_BF + bias_F
    assert int((pre_BF == cut).sum()) > int((vals_N == cut).sum()) > 0
    assert len(kept) == k * B
    assert set((kept.rows * F + kept.cols).tolist()) == _topk_set(torch.relu(pre_BF), k * B)  # the reference's input


@pytest.mark.usefixtures("selection_path")
def test_a_tie_straddling_the_cut_is_broken_as_topk_breaks_it():
    g = torch.Generator().manual_seed(1)
    pre_BF = torch.rand(256, 1024, generator=g)
    n = 8 * 256
    cut = pre_BF.flatten().topk(n).values[-1]
    tied = torch.randperm(pre_BF.numel(), generator=g)[:5]
    pre_BF.view(-1)[tied] = cut  # now 6 entries share the n-th largest value
    kept, _ = batch_topk_select(pre_BF, n)
    assert len(kept) == n
    assert set((kept.rows * 1024 + kept.cols).tolist()) == _topk_set(pre_BF, n)


@pytest.mark.usefixtures("selection_path")
def test_selection_of_a_tensor_that_carries_autograd_keeps_the_graph():
    # What `SAE.encode` does under autograd (attribution, a hand-written training loop): the kept values
    # and their gradient are the dense topk's, on either route.
    g = torch.Generator().manual_seed(3)
    x_BD, W_DF = torch.randn(128, 16, generator=g), torch.randn(16, 512, generator=g).requires_grad_()
    b_F = (torch.randn(512, generator=g) * 0.1).requires_grad_()
    pre_BF = x_BD @ W_DF
    kept, vals_N = batch_topk_select(pre_BF, 8 * 128, bias_F=b_F)
    biased_BF = torch.relu(pre_BF + b_F)
    assert set((kept.rows * 512 + kept.cols).tolist()) == _topk_set(biased_BF, 8 * 128)
    assert vals_N.requires_grad
    grads = torch.autograd.grad(vals_N.square().sum(), (W_DF, b_F), retain_graph=True)
    ref_BF = batch_topk(biased_BF, 8)
    ref = torch.autograd.grad(ref_BF.square().sum(), (W_DF, b_F))
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want)  # sums of the same terms in other orders


class ThreadComm:
    """A stand-in for Accelerate across `world` threads: cat concatenates in rank order."""

    def __init__(self, world: int, rank: int, shared: dict):
        self.world_size, self.rank, self.shared = world, rank, shared

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        self.shared["slots"][self.rank] = t
        self.shared["barrier"].wait()
        out = torch.cat(list(self.shared["slots"]))
        self.shared["barrier"].wait()
        return out


@pytest.mark.parametrize("ties", [False, True])
def test_selection_across_processes_is_the_global_topk(ties):
    g = torch.Generator().manual_seed(2)
    world, B, F, k = 2, 128, 512, 8
    pre_BF = torch.relu(torch.randn(world * B, F, generator=g))
    n = k * world * B
    if ties:  # a tie across the cut, spread over both shares
        cut = pre_BF.flatten().topk(n).values[-1]
        pre_BF[0, :3] = cut
        pre_BF[B, :3] = cut
    shared, results = {"slots": [None] * world, "barrier": threading.Barrier(world)}, [None] * world

    def run(rank: int) -> None:
        results[rank] = batch_topk_select(pre_BF[rank * B:(rank + 1) * B], n, ThreadComm(world, rank, shared))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    flat = torch.cat([(kept.rows + r * B) * F + kept.cols for r, (kept, _) in enumerate(results)])
    assert flat.numel() == n
    cutoff = pre_BF.flatten().topk(n).values[-1]
    assert bool((pre_BF.flatten()[flat] >= cutoff).all())
    assert int((pre_BF > cutoff).sum()) <= n
    if not ties:
        assert set(flat.tolist()) == _topk_set(pre_BF, n)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sparse_products_give_the_dense_values_and_gradients(arch):
    torch.manual_seed(0)
    D, F, B, k = 24, 96, 40, 6
    sae = BatchTopKSAE(D, F, k) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(D, F, k, [32, 64])
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc_F.normal_(0, 0.1)
    x_BD = torch.randn(B, D) * 2
    target_BD = torch.randn(B, D)

    # Dense: the reference autograd graph through the full [B, F] code.
    f_BF = sae.encode(x_BD, use_threshold=False)
    dense_BD = f_BF @ sae.W_dec_FD
    (dense_BD - target_BD).pow(2).sum().backward()
    dense_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    with torch.no_grad():
        pre_BF = sae.pre_acts(x_BD)
    kept, vals_N = batch_topk_select(pre_BF, k * B)
    sparse_BD = decode_kept(encode_kept(sae, x_BD, vals_N, kept), sae.W_dec_FD, kept)
    (sparse_BD - target_BD).pow(2).sum().backward()
    # Both select from the same pre-activations (the same code on the same tensors), so the same k*B
    # entries; the sparse products then sum them in another order than the dense GEMMs: fp32 rounding of
    # sums of <= 96 terms of order 1 (~1e-6), and the weight gradients sum over 40 tokens (rtol 1e-4).
    torch.testing.assert_close(sparse_BD, dense_BD.detach(), rtol=1e-5, atol=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_kept_by_group_splits_each_row_into_its_groups():
    kept = Kept.from_flat(torch.tensor([1, 5, 9, 12, 14]), (2, 8))  # (0,1) (0,5) (1,1) (1,4) (1,6)
    grouped = kept.by_group([0, 4, 8])
    assert grouped.shape == (4, 8) and grouped.cols.tolist() == kept.cols.tolist()
    assert grouped.rows.tolist() == [0, 1, 2, 3, 3]  # row b * 2 + group
    vals = torch.arange(1.0, 6.0)
    dense, split = kept.dense(vals), grouped.dense(vals).view(2, 2, 8)
    torch.testing.assert_close(split[:, 0, :4], dense[:, :4])
    torch.testing.assert_close(split.sum(dim=1), dense)
    assert not split[:, 0, 4:].any() and not split[:, 1, :4].any()


def test_matryoshka_active_groups_zero_the_later_latents():
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(8, 32, 4, [8, 24])
    with torch.no_grad():
        sae.threshold.fill_(0.0)
    x = torch.randn(16, 8)
    full = sae.encode(x)
    sae.active_groups = 1
    nested = sae.encode(x)
    assert torch.equal(nested[:, :8], full[:, :8]) and not nested[:, 8:].any()  # the same encode, then a mask
