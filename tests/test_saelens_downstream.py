"""The stages after training handle SAEs of SAELens' algorithm: the threshold stage (`ema` is SAELens' own
topk_threshold, folded as save_inference_model folds it), `workbench eval`, export and `workbench verify`, and
training on 2 processes gives the SAEs of 1. Tiny shapes on a cache of the demo model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import accelerate_two_cpu_processes

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.data import iter_batches
from workbench.evaluate import evaluate_with_model, heldout_rows
from workbench.export import export_run
from workbench.formats import dictionary_learning as dl
from workbench.formats.convert import load_trainable
from workbench.model import load_model, load_tokenizer
from workbench.threshold import calibrate
from workbench.training import read_metrics, train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
LAYER = 2
K = 8
SAES = [{"name": "btk", "arch": "batchtopk", "width": 128, "k": K},
        {"name": "mat", "arch": "matryoshka", "width": 128, "k": K, "group_fractions": [0.25, 0.75]}]
DATA = ["data.num_tokens=16384", "data.context_length=64"]
# SAELens' settings with a short dead window (dead latents and the aux loss within the run) and its scaling.
SAELENS = {"lr": 1e-3, "dead_feature_window": 30, "normalize_activations": "expected_average_only_in",
           "n_batches_for_norm_estimate": 10}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream_cache") / "cache"
    collect(load_recipe(DEMO, [f"collect.out={out}", *DATA, "collect.layers=[2]"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train_keys) -> Path:
    # the demo's dictionary_learning keys back at their defaults: the saelens algorithm refuses them set
    section = {"algorithm": "saelens", "saelens": SAELENS, "cache": str(cache), "layers": [LAYER], "saes": SAES,
               "batch_size": 256, "num_tokens": 256 * 120, "eval_tokens": 2048, "checkpoint_every": 1000,
               "warmup_steps": 1000, "threshold_start_step": 1000, "out": str(out)} | train_keys
    path.write_text(yaml.safe_dump({"base": str(DEMO), "data": {"num_tokens": 16384, "context_length": 64},
                                    "train": section}))
    return path


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downstream_run")
    train(load_recipe(write_recipe(root / "recipe.yaml", cache, root / "saes")))
    return root


def folder(run: Path, name: str) -> Path:
    return run / "saes" / f"resid_post_layer_{LAYER}" / name


@pytest.mark.parametrize("name", [sae["name"] for sae in SAES])
def test_threshold_methods_on_a_saelens_sae_and_ema_is_its_topk_threshold(run, name):
    sae_folder = folder(run, name)
    report = calibrate(sae_folder, batch_size=256, num_tokens=2048, write=False)
    section = json.loads((sae_folder / dl.CONFIG_FILE).read_text())["workbench"]
    last = read_metrics(sae_folder / "metrics.jsonl")[-1]
    ema = report.result("ema")
    # SAELens' topk_threshold after the last step, in raw units (save_inference_model divides it by the scaling)
    assert ema.threshold == pytest.approx(last["threshold"] * section["norm_factor"], rel=1e-6)
    assert ema.threshold == float(dl.load_state_dict(sae_folder / dl.AE_FILE)["threshold"])
    assert report.split == "holdout" and report.batch_topk_l0 == pytest.approx(K)
    assert report.result("l0").l0 == pytest.approx(K, abs=1e-3)
    for method in ("batch-min", "l0"):
        m = report.result(method)
        assert abs(m.l0 - K) <= 0.1 * K and abs(m.fve - report.batch_topk_fve) <= 0.01, m
    # SAELens' EMA starts at 0 (rate 0.01 from step 0): after 120 steps 0.99^120 = 30% of it still is that 0,
    # so it sits below the batch cut and fires more than k a token
    assert ema.threshold < report.result("batch-min").threshold and ema.l0 > K


def test_threshold_written_into_a_saelens_sae_keeps_its_topk_threshold_as_ema(run, tmp_path):
    import shutil

    sae_folder = tmp_path / "btk"
    shutil.copytree(folder(run, "btk"), sae_folder)
    before = float(dl.load_state_dict(sae_folder / dl.AE_FILE)["threshold"])
    report = calibrate(sae_folder, method="l0", batch_size=256, num_tokens=2048)
    record = json.loads((sae_folder / dl.CONFIG_FILE).read_text())["workbench"]["threshold"]
    assert record["method"] == "l0" and record["ema"] == before and record["previous"] == {"threshold": before, "method": "ema"}
    assert float(dl.load_state_dict(sae_folder / dl.AE_FILE)["threshold"]) == pytest.approx(report.result("l0").threshold)
    again = calibrate(sae_folder, batch_size=256, num_tokens=2048, write=False)
    assert again.result("ema").threshold == before  # the training estimate is kept once replaced


def test_workbench_eval_splices_the_saelens_sae(run, tmp_path, capsys):
    import shutil

    sae_folder = tmp_path / "mat"
    shutil.copytree(folder(run, "mat"), sae_folder)
    overrides = [*DATA, "eval.num_tokens=1024"]
    assert main(["eval", str(sae_folder), str(DEMO), *overrides]) == 0
    results = json.loads((sae_folder / dl.EVAL_FILE).read_text())
    recipe = load_recipe(DEMO, overrides)
    model, tokenizer = load_model(recipe.model), load_tokenizer(recipe.model)
    batches = list(iter_batches(heldout_rows(recipe, tokenizer), recipe.eval.batch_size, tokenizer.pad_token_id))
    direct = evaluate_with_model(model, tokenizer, load_trainable(sae_folder), LAYER, batches)
    for key in ("loss_original", "loss_reconstructed", "loss_zero", "frac_recovered", "kl_div"):
        assert results[key] == pytest.approx(direct[key], rel=1e-6), key
    assert results["loss_original"] < results["loss_reconstructed"] < results["loss_zero"]
    assert results["frac_recovered"] > 0.8  # 128 latents after 120 steps (measured 0.89)


def test_both_exports_of_saelens_saes_verify_against_their_libraries(run, cache, tmp_path, capsys):
    for fmt in ("dictionary_learning", "saelens"):
        export_run(run / "saes", fmt, tmp_path / fmt)
    capsys.readouterr()
    assert main(["verify", str(tmp_path), "--cache", str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("OK ") for line in lines) == 4
    assert any("[sae_lens jumprelu]" in line for line in lines)
    assert any("[dictionary_learning MatryoshkaBatchTopKSAE]" in line for line in lines)
    assert lines[-1] == "4 of 4 SAEs match their reference library"


def test_two_processes_train_the_saelens_saes_of_one(run, cache, tmp_path):
    """The batch top-k, topk_threshold and dead counters come from the global batch and the gradients are
    averaged: 2 processes end where 1 does, to the rounding of the reassociated sums (test_train.py measures
    it for dictionary_learning's algorithm); the counts are exact."""
    launch, env = accelerate_two_cpu_processes(tmp_path)
    two = subprocess.run([*launch, "train", str(write_recipe(tmp_path / "two.yaml", cache, tmp_path / "two"))],
                         cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for sae in SAES:
        one_dir = folder(run, sae["name"])
        two_dir = tmp_path / "two" / f"resid_post_layer_{LAYER}" / sae["name"]
        a, b = (torch.load(d / dl.AE_FILE, weights_only=True) for d in (one_dir, two_dir))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        ones, twos = read_metrics(one_dir / "metrics.jsonl"), read_metrics(two_dir / "metrics.jsonl")
        assert [r["dead"] for r in ones] == [r["dead"] for r in twos] and [r["l0"] for r in ones] == [r["l0"] for r in twos]
        assert max(r["dead"] for r in ones) > 0  # the aux loss ran: dead latents counted over the global batch
        assert [r["threshold"] for r in ones] == pytest.approx([r["threshold"] for r in twos], rel=1e-5)


def test_sparse_steps_train_in_two_processes_as_in_one_and_as_well_as_the_exact_steps(run, cache, tmp_path):
    """train.saelens.exact false through the loop: 2 processes end where 1 does (the global batch top-k,
    threshold and counters), and the SAEs reconstruct the held-out tokens as well as the exact steps' SAEs do
    (tests/test_saelens_sparse_step.py proves each sparse step equal to the exact one)."""
    sparse = {**SAELENS, "exact": False}
    train(load_recipe(write_recipe(tmp_path / "one.yaml", cache, tmp_path / "one", saelens=sparse)))
    launch, env = accelerate_two_cpu_processes(tmp_path)
    two = subprocess.run([*launch, "train", str(write_recipe(tmp_path / "two.yaml", cache, tmp_path / "two", saelens=sparse))],
                         cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for sae in SAES:
        dirs = {side: tmp_path / side / f"resid_post_layer_{LAYER}" / sae["name"] for side in ("one", "two")}
        a, b = (torch.load(d / dl.AE_FILE, weights_only=True) for d in dirs.values())
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        ones, twos = (read_metrics(d / "metrics.jsonl") for d in dirs.values())
        assert [r["dead"] for r in ones] == [r["dead"] for r in twos] and max(r["dead"] for r in ones) > 0
        exact = json.loads((folder(run, sae["name"]) / "eval_results.json").read_text())
        ours = json.loads((dirs["one"] / "eval_results.json").read_text())
        assert ours["frac_variance_explained"] == pytest.approx(exact["frac_variance_explained"], abs=0.01)
        assert ours["frac_variance_explained"] > 0.5
