"""The CPU kernels of the selections (workbench.sae.kernels) give exactly what torch's operations give:
the same index sets and values, on the inputs that take other branches (NaN, infinities, ties at a cut,
widths not a multiple of 8, more entries than the room first given, rows split across threads). The
selection tests of test_sae_sparse.py and test_auxk.py run on both routes against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import torch_threads

from workbench.sae import auxk_select, batch_topk_select, kernels, sparse


def torch_route(fn):
    """fn() with the CPU kernels off: torch's operations, the route of every other device."""
    sparse.CPU_KERNELS = False
    try:
        return fn()
    finally:
        sparse.CPU_KERNELS = True


def odd_values(B: int, F: int, seed: int, nan: bool = True) -> torch.Tensor:
    """Gaussian values with +inf and -inf entries, many exact ties (a 1/64 grid), and with `nan` NaN entries
    and a whole NaN row."""
    g = torch.Generator().manual_seed(seed)
    pre_BF = (torch.randn(B, F, generator=g) * 64).round() / 64
    at = torch.randperm(B * F, generator=g)[:30]
    pre_BF.view(-1)[at[10:20]] = float("inf")
    pre_BF.view(-1)[at[20:]] = -float("inf")
    if nan:
        pre_BF.view(-1)[at[:10]] = float("nan")
        pre_BF[3] = float("nan")
    return pre_BF


@pytest.mark.parametrize("B,F", [(64, 4096), (37, 1003), (5, 7)])
@pytest.mark.parametrize("threads", [1, 2])
def test_entries_above_is_the_compare_and_nonzero(B, F, threads):
    pre_BF = odd_values(B, F, B + F)
    thr_F = (torch.randn(F, generator=torch.Generator().manual_seed(0)) * 64).round() / 64 + 1.0
    thr_F[:3] = pre_BF[0, :3]  # entries equal to their threshold are not above it
    expected = torch.nonzero((pre_BF > thr_F).view(-1)).squeeze(1)
    with torch_threads(threads):
        for room in (1, 10 * B * F):  # 1: every block needs the second pass
            assert torch.equal(kernels.entries_above(pre_BF, thr_F, room), expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_topk_select_on_odd_values_is_that_of_torch_ops(threads, with_bias):
    B, F, k = 128, 2048, 16
    product_BF = odd_values(B, F, 7)
    bias_F = (torch.randn(F, generator=torch.Generator().manual_seed(8)) * 8).round() / 8 if with_bias else None
    with torch_threads(threads):
        kept, vals_N = batch_topk_select(product_BF, k * B, bias_F=bias_F)
        ref, ref_vals_N = torch_route(lambda: batch_topk_select(product_BF, k * B, bias_F=bias_F))
    assert torch.equal(kept.rows, ref.rows) and torch.equal(kept.cols, ref.cols)
    assert torch.equal(vals_N, ref_vals_N)


# F 4096 / k 128: the per-row floor from block maxima; F 600 / k 128: rows too short for it (every positive
# entry a candidate); the dead columns: all, most, a few.
@pytest.mark.parametrize("F,k", [(4096, 128), (600, 128)])
@pytest.mark.parametrize("dead_every", [1, 3, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_top_is_the_aux_k_selection_of_torch_ops(F, k, dead_every, threads):
    B = 96
    # No NaN: a NaN pre-activation makes the step's loss NaN (the trainer stops on it), and torch's route
    # leaves NaN out of a token's picks where topk would count it the largest.
    pre_BF = odd_values(B, F, F + dead_every, nan=False)
    pre_BF[5] = (pre_BF[5] * 2).round() / 2  # a coarse grid: ties straddle row 5's cut
    pre_BF[6] -= 2.5  # fewer than k positive entries
    bias_F = (torch.randn(F, generator=torch.Generator().manual_seed(9)) * 8).round() / 8
    dead_M = torch.arange(0, F, dead_every)
    for bias in (None, bias_F):
        before = pre_BF.clone()
        with torch_threads(threads):
            kept, vals_N = auxk_select(pre_BF, dead_M, k, bias)
        assert torch.equal(pre_BF, before)  # read, never written
        ref, ref_vals_N = torch_route(lambda b=bias: auxk_select(pre_BF.clone(), dead_M, k, b))
        assert torch.equal(kept.rows, ref.rows) and torch.equal(kept.cols, ref.cols)
        assert torch.equal(vals_N, ref_vals_N)
        if dead_every == 1 and bias is None:
            counts_B = torch.bincount(kept.rows, minlength=B)
            assert counts_B[5] == k and 0 < counts_B[6] < k  # the tied row; the row short of positives
            assert 5 in kernels.row_top(pre_BF, dead_M, k, None)[3].tolist()  # left to topk


def test_row_top_with_k_zero_keeps_nothing():
    rows_N, cols_N, vals_N, flagged_T = kernels.row_top(torch.randn(4, 64), torch.arange(64), 0, None)
    assert rows_N.numel() == cols_N.numel() == vals_N.numel() == flagged_T.numel() == 0


@pytest.mark.parametrize("N", [0, 1, 5000])
def test_by_column_is_the_stable_sort_by_column(N):
    B, F = 300, 700
    g = torch.Generator().manual_seed(N)
    flat = torch.randperm(B * F, generator=g)[:N].sort().values
    rows_N, cols_N = flat // F, flat % F
    order, rows, crow = kernels.by_column(rows_N, cols_N, F)
    expected = torch.sort(cols_N.to(torch.int32), stable=True).indices
    assert torch.equal(order, expected)
    assert torch.equal(rows, rows_N[expected])
    assert torch.equal(crow, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(cols_N, minlength=F).cumsum(0)]))


@pytest.mark.parametrize("n", [1, 777, 2048])
def test_top_n_is_the_topk_of_the_candidates(n):
    # Negative, positive, zero, infinite values: the radix selection orders them as floats.
    g = torch.Generator().manual_seed(n)
    pre_BF = torch.randn(64, 64, generator=g) * 10.0 ** torch.randint(-3, 4, (64, 64), generator=g)
    pre_BF[0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    bias_F = torch.randn(64, generator=g)
    cand_N = torch.arange(0, 64 * 64, 2)
    vals_N = pre_BF.view(-1)[cand_N] + bias_F[cand_N % 64]
    idx, vals = kernels.top_n(pre_BF, bias_F, cand_N, n, -float("inf"))
    top = vals_N.topk(n)
    assert torch.equal(idx, cand_N[top.indices].sort().values)
    assert torch.equal(vals, vals_N[torch.isin(cand_N, idx)])
    assert kernels.top_n(pre_BF, bias_F, cand_N, n, float(top.values[-1])) is None  # only n - 1 above that cut
    if n < cand_N.numel():  # without the bias, one more candidate equal to the n-th value: a tie straddling it
        plain_N = pre_BF.view(-1)[cand_N]
        kth = plain_N.topk(n).values[-1]
        tied = pre_BF.clone()
        tied.view(-1)[cand_N[(plain_N < kth).nonzero()[0, 0]]] = kth
        assert kernels.top_n(pre_BF, None, cand_N, n, -float("inf")) is not None
        assert kernels.top_n(tied, None, cand_N, n, -float("inf")) is None
