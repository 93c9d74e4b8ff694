"""The sink filter and first-token removal, on hand-made batches with known answers."""

from __future__ import annotations

import torch

from workbench.sink import batch_median, first_token_mask, is_sink, sink_filter


def _acts_with_norms(norms_BL: torch.Tensor, d: int = 4) -> torch.Tensor:
    """Activations [B, L, d] whose token norms are exactly norms_BL (all mass on the first coordinate)."""
    acts = torch.zeros(*norms_BL.shape, d)
    acts[..., 0] = norms_BL
    return acts


def test_median_is_the_lower_middle_value_like_torch_median():
    norms = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert batch_median(norms).item() == 2.0  # lower median of an even count, as the reference
    assert batch_median(norms, torch.tensor([[True, True, True, False]])).item() == 2.0


def test_sink_is_strictly_above_multiple_times_median():
    acts = _acts_with_norms(torch.tensor([[1.0, 1.0, 1.0, 10.0, 10.0001, 50.0]]))
    flt = sink_filter(acts, multiple=10.0)
    assert flt.median.item() == 1.0
    assert flt.sink_BL.tolist() == [[False, False, False, False, True, True]]  # 10.0 == 10 x median is kept
    assert flt.keep_BL.tolist() == [[True, True, True, True, False, False]]


def test_median_over_real_tokens_ignores_padding_and_all_reproduces_the_reference():
    # Row 0: 4 real tokens and 2 padding positions; row 1: 1 real token and 5 padding positions.
    # Padding positions have large norms (the model still computes something there).
    norms = torch.tensor([[1.0, 1.0, 1.0, 12.0, 30.0, 30.0],
                          [1.0, 30.0, 30.0, 30.0, 30.0, 30.0]])
    valid = torch.tensor([[True, True, True, True, False, False], [True, False, False, False, False, False]])
    acts = _acts_with_norms(norms)
    real = sink_filter(acts, 10.0, valid, "real")
    everything = sink_filter(acts, 10.0, valid, "all")
    assert real.median.item() == 1.0  # over the 5 real tokens
    assert everything.median.item() == torch.median(norms.flatten()).item() == 30.0  # the reference rule
    # 12 > 10 x 1 is a sink under "real"; the padding raises the "all" median and the token is kept.
    assert real.sink_BL[0, 3] and not everything.sink_BL[0, 3]
    assert real.keep_BL.tolist() == [[True, True, True, False, False, False], [True] + [False] * 5]
    assert everything.keep_BL.tolist() == [[True, True, True, True, False, False], [True] + [False] * 5]
    # Padding is never kept and never a sink, whatever the median.
    assert not real.sink_BL[~valid].any() and not everything.sink_BL[~valid].any()


def test_all_and_real_agree_on_a_batch_without_padding():
    torch.manual_seed(0)
    acts = torch.randn(3, 7, 5)
    acts[1, 4] *= 100
    a = sink_filter(acts, 10.0, torch.ones(3, 7, dtype=torch.bool), "real")
    b = sink_filter(acts, 10.0, torch.ones(3, 7, dtype=torch.bool), "all")
    assert a.median.item() == b.median.item()
    assert torch.equal(a.keep_BL, b.keep_BL) and a.sink_BL.sum().item() == 1 and bool(a.sink_BL[1, 4])


def test_filter_off_keeps_every_real_token_but_still_reports_the_median():
    acts = _acts_with_norms(torch.tensor([[1.0, 1000.0, 2.0]]))
    flt = sink_filter(acts, None, torch.tensor([[True, True, False]]))
    assert flt.keep_BL.tolist() == [[True, True, False]] and not flt.sink_BL.any()
    assert flt.median.item() == 1.0


def test_norms_are_float32_of_the_model_dtype_activation():
    acts = torch.randn(2, 3, 16).to(torch.bfloat16)
    flt = sink_filter(acts, 10.0)
    assert flt.norms_BL.dtype == torch.float32
    assert torch.equal(flt.norms_BL, acts.float().norm(dim=-1))  # the same op on the same tensor: exact


def test_is_sink_broadcasts_a_median_per_token():
    norms = torch.tensor([5.0, 5.0, 50.0])
    medians = torch.tensor([1.0, 0.4, 5.0])
    assert is_sink(norms, medians, 10.0).tolist() == [False, True, False]


def test_first_token_with_bos_drops_every_bos_token():
    ids = torch.tensor([[2, 5, 6, 2, 7], [2, 8, 0, 0, 0]])  # BOS = 2; packed row 0 holds a second document
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert first_token_mask(ids, mask, bos_token_id=2).tolist() == [
        [True, False, False, True, False], [True, False, False, False, False]]


def test_first_token_without_bos_drops_the_first_real_token_of_each_row_right_or_left_padded():
    ids = torch.tensor([[9, 5, 6, 0], [0, 0, 8, 4], [7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert first_token_mask(ids, mask, bos_token_id=None).tolist() == [
        [True, False, False, False], [False, False, True, False], [True, False, False, False]]


def test_a_batch_without_real_tokens_has_no_median_and_keeps_nothing():
    flt = sink_filter(torch.ones(1, 3, 4), 10.0, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.isnan(flt.median) and not flt.keep_BL.any()
