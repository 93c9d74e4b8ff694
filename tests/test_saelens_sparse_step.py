"""train.saelens.exact false: SAELens' step computed with sparse products (`SAELensTrainer._sparse_losses`) is
the exact step (`_exact_losses`, which tests/test_saelens_trainer_parity.py proves bit-identical to sae-lens
6.54.12's `SAETrainer`) to float rounding, on the parity test's four runs (both architectures, every schedule,
normalisation, rescaled acts on and off, both aux losses with dead latents).

The comparison is step by step: before each of 1000 steps the sparse trainer is given the exact trainer's whole
state (weights, Adam, the schedule, the counters, the threshold), and after the step every parameter and the
threshold agree to 1e-5, the counters, the dead count and the learning rate exactly. Left to run on their own,
two float-rounding variants of the same step part at the first near-tie at a top-k cut that rounds the other
way (measured: 3 of the 4 runs were more than 1e-5 apart by step 1500, by 2e-5 to 2e-1; as two seeds would),
so the proof of the sparse step is each step's, and of the run it trains, its quality (the slow test)."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from conftest import torch_threads

sys.path.insert(0, str(Path(__file__).parent))
import test_saelens_trainer_parity as parity  # noqa: E402

from workbench.config import SAELensTrainConfig  # noqa: E402
from workbench.training.saelens_step import SAELensTrainer, dead_picks, scaling_factor  # noqa: E402


def trainers(name: str, steps: int) -> tuple[SAELensTrainer, SAELensTrainer, float]:
    """(exact, sparse) trainers of one parity run from the same initial weights, and the run's input scale."""
    arch, keys = parity.RUNS[name]
    settings = SAELensTrainConfig(**keys, n_batches_for_norm_estimate=parity.NORM_BATCHES)
    exact = SAELensTrainer(parity.new_sae(arch, settings), steps, settings)
    sparse = SAELensTrainer(parity.new_sae(arch, settings), steps, dataclasses.replace(settings, exact=False))
    return exact, sparse, settings


def teacher_forced(name: str, steps: int) -> dict:
    """Every step of the run from the exact trainer's state: the largest parameter difference after a step, and
    what the run exercised."""
    data = parity.batches(steps)
    exact, sparse, settings = trainers(name, steps)
    scale = 1.0
    if settings.normalize_activations == "expected_average_only_in":
        scale = scaling_factor(iter(data), parity.D, parity.NORM_BATCHES)
    worst, dead, aux = 0.0, 0, 0.0
    with torch_threads(1):
        for x_BD in data[parity.NORM_BATCHES:] * scale:
            sparse.load_state_dict(copy.deepcopy(exact.state_dict()))
            ours, theirs = sparse.update(x_BD, log=True), exact.update(x_BD, log=True)
            a, b = sparse.training_state(), exact.training_state()
            worst = max(worst, *(float((a[key].double() - b[key].double()).abs().max()) for key in b))
            assert torch.equal(sparse.n_forward_passes_since_fired, exact.n_forward_passes_since_fired)
            assert (ours["dead"], ours["lr"], ours["l0"]) == (theirs["dead"], theirs["lr"], theirs["l0"])
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            dead, aux = max(dead, theirs["dead"]), max(aux, theirs["auxk_loss"])
    return {"worst": worst, "dead": dead, "aux": aux}


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_each_sparse_step_is_the_exact_step(name):
    r = teacher_forced(name, 1000)
    assert r["worst"] <= 1e-5
    assert r["dead"] > 0 and r["aux"] > 0  # dead latents with the aux loss active


@pytest.mark.slow
@pytest.mark.parametrize("name", ["batchtopk_plain_decoder", "matryoshka_standard_aux"])
def test_each_sparse_step_is_the_exact_step_other_settings(name):
    r = teacher_forced(name, 1000)
    assert r["worst"] <= 1e-5
    assert r["dead"] > 0 and r["aux"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(parity.RUNS))
def test_a_sparse_run_trains_as_well_as_the_exact_one(name):
    """1500 steps each on their own: the same reconstruction (the mean loss of the last 100 steps within 2%) and
    the same sparsity (L0 is k by construction; the dead count within 10% of the dictionary)."""
    steps = 1500
    data = parity.batches(steps)
    exact, sparse, settings = trainers(name, steps)
    scale = 1.0
    if settings.normalize_activations == "expected_average_only_in":
        scale = scaling_factor(iter(data), parity.D, parity.NORM_BATCHES)
    logs = {"exact": [], "sparse": []}
    with torch_threads(1):
        for x_BD in data[parity.NORM_BATCHES:] * scale:
            logs["exact"].append(exact.update(x_BD, log=True))
            logs["sparse"].append(sparse.update(x_BD, log=True))
    mse = {side: sum(r["mse"] for r in rows[-100:]) / 100 for side, rows in logs.items()}
    assert mse["sparse"] == pytest.approx(mse["exact"], rel=0.02)
    assert mse["exact"] < 0.5 * logs["exact"][0]["mse"]  # both learned
    assert abs(logs["sparse"][-1]["dead"] - logs["exact"][-1]["dead"]) <= 0.1 * parity.F


@pytest.mark.parametrize("dead", ["all", "half", "tenth"])
@pytest.mark.parametrize("shift", [0.0, -2.5])  # -2.5: most rows have fewer than k positive dead values
def test_dead_picks_overwriting_is_the_topk_over_the_dead_columns(dead, shift):
    """The aux rule's picks with `overwrite` (auxk_select, then the top-k where a row has too few positive
    values) are exactly SAELens' `hidden_pre[:, dead].topk(k)` entries, negative ones included."""
    g = torch.Generator().manual_seed(1)
    B, F, k = 256, 2048, 16
    hidden_BF = torch.randn(B, F, generator=g) + shift
    dead_M = {"all": torch.arange(F), "half": torch.arange(0, F, 2), "tenth": torch.arange(0, F, 10)}[dead]
    top = hidden_BF[:, dead_M].topk(k, dim=1)
    expected = {(b, int(dead_M[j])) for b in range(B) for j in top.indices[b].tolist()}
    picks, vals_N = dead_picks(hidden_BF.clone(), dead_M, k, overwrite=True)
    assert set(zip(picks.rows.tolist(), picks.cols.tolist(), strict=True)) == expected
    assert torch.equal(vals_N, hidden_BF[picks.rows, picks.cols])
    assert torch.equal(picks.rows * F + picks.cols, (picks.rows * F + picks.cols).sort().values)  # row-major


def test_a_sparse_run_resumed_from_its_state_dict_is_the_uninterrupted_run(tmp_path):
    """The checkpoint contract (what the loop saves and a kill -9 resumes from) holds for the sparse form too:
    stopped after 100 steps (past the warmup), saved, loaded into a fresh trainer and continued into the decay,
    it ends bit for bit where the uninterrupted run does."""
    steps = 200
    data = parity.batches(steps)[parity.NORM_BATCHES:]
    with torch_threads(1):
        _, whole, _ = trainers("matryoshka", steps)
        for x_BD in data:
            whole.update(x_BD)
        _, first, _ = trainers("matryoshka", steps)
        for x_BD in data[:100]:
            first.update(x_BD)
        torch.save(first.state_dict(), tmp_path / "checkpoint.pt")
        _, resumed, _ = trainers("matryoshka", steps)
        resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
        for x_BD in data[100:]:
            resumed.update(x_BD)
    a, b = resumed.training_state(), whole.training_state()
    assert all(torch.equal(a[key], b[key]) for key in b)
    assert torch.equal(resumed.n_forward_passes_since_fired, whole.n_forward_passes_since_fired)
