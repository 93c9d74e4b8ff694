"""The tests' own float comparisons (conftest): a code compared across two computations forgives a latent
on its cut, and nothing else; the scale tolerance fails on a real difference."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_TOL, assert_close_to_scale, assert_codes_close, smallest_kept


def jumprelu_code(threshold: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    pre_NF = torch.randn(16, 32, generator=g).abs() * 2
    return pre_NF * (pre_NF > threshold)


def test_a_latent_on_the_threshold_may_fire_on_one_side_only():
    f_NF = jumprelu_code()
    j = int((f_NF[3] == 0).nonzero()[0])
    on_cut = f_NF.clone()
    on_cut[3, j] = 0.5 + 0.1 * FP32_TOL * float(f_NF.abs().max())  # off in f_NF, on just above the threshold
    rows_N = assert_codes_close(on_cut, f_NF, 0.5)
    assert rows_N.tolist() == [i == 3 for i in range(16)]
    with pytest.raises(AssertionError, match="flip at the cut"):
        assert_codes_close(on_cut, f_NF, 0.5, max_flips=0)


def test_a_latent_away_from_the_threshold_or_a_drifted_value_is_a_mismatch():
    f_NF = jumprelu_code()
    kept = f_NF.nonzero()
    n, j = (int(i) for i in kept[int(f_NF[f_NF != 0].argmax())])
    lost = f_NF.clone()
    lost[n, j] = 0.0  # the largest latent, far above the threshold
    with pytest.raises(AssertionError, match="away from the cut"):
        assert_codes_close(lost, f_NF, 0.5)
    drifted = f_NF * (1 + 1e-3)
    with pytest.raises(AssertionError, match="away from the cut"):
        assert_codes_close(drifted, f_NF, 0.5)
    with pytest.raises(AssertionError, match="max |diff|"):
        assert_close_to_scale(drifted, f_NF)
    assert_close_to_scale(f_NF * (1 + 1e-7), f_NF)


def test_a_top_k_swap_at_the_cut_is_forgiven_and_many_flips_are_not():
    f_NF = torch.zeros(4, 8)
    f_NF[:, :3] = torch.tensor([3.0, 2.0, 1.0])
    swapped = f_NF.clone()
    swapped[:, 2], swapped[:, 5] = 0.0, 1.0 + 1e-7  # every row swaps its smallest kept latent
    cut = smallest_kept(f_NF, dim=1)
    assert cut.flatten().tolist() == [1.0] * 4
    assert_codes_close(swapped[:1], f_NF[:1], cut[:1])
    with pytest.raises(AssertionError, match="8 latents flip"):
        assert_codes_close(swapped, f_NF, cut)
