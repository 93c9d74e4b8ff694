"""`workbench train` with train.algorithm saelens on a cache of the demo model: the loop drives
SAELensTrainer (tests/test_saelens_trainer_parity.py proves the step against sae-lens), folds what SAELens'
fit() and save_inference_model fold, records the algorithm, resumes after kill -9 to the same bits, and the
SAELens export loads with SAE.load_from_disk with the same outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_close_to_scale

from workbench.cache import ActivationCache
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.formats import saelens
from workbench.formats.convert import convert, load_trainable
from workbench.training import read_metrics, train

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
SAES = [{"name": "btk", "arch": "batchtopk", "width": 256, "k": 8},
        {"name": "mat", "arch": "matryoshka", "width": 256, "k": 8, "group_fractions": [0.125, 0.375, 0.5]}]
# The demo recipe's dictionary_learning settings back at their defaults (the saelens algorithm refuses them).
DL_DEFAULTS = {"warmup_steps": 1000, "threshold_start_step": 1000}
SAELENS = {"lr": 1e-3, "dead_feature_window": 50, "normalize_activations": "expected_average_only_in",
           "n_batches_for_norm_estimate": 20, "lr_decay_steps": 50}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """32,768 tokens of the demo corpus through the demo model, layers 2 and 3."""
    out = tmp_path_factory.mktemp("saelens_cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=32768",
                                                          "data.context_length=64"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train_keys) -> Path:
    section = {"algorithm": "saelens", "saelens": SAELENS, "cache": str(cache), "layers": [LAYER], "saes": SAES,
               "batch_size": 256, "num_tokens": 256 * 300, "eval_tokens": 4096, "checkpoint_every": 1000,
               "out": str(out), **DL_DEFAULTS} | train_keys
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": section}))
    return path


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saelens_trained")
    train(load_recipe(write_recipe(root / "recipe.yaml", cache, root / "saes")))
    return root / "saes" / f"resid_post_layer_{LAYER}"


def test_the_folder_records_the_algorithm_and_holds_the_folded_inference_sae(trained):
    for cfg in SAES:
        folder = trained / cfg["name"]
        section = json.loads((folder / "config.json").read_text())["workbench"]
        assert section["algorithm"] == "saelens" and section["saelens"]["dead_feature_window"] == 50
        assert section["saelens"]["rescale_acts_by_decoder_norm"] is True and section["normalize_activations"] is True
        sae = load_trainable(folder)
        # save_inference_model's fold: unit decoder rows; the threshold is the trained topk_threshold in raw
        # units (the last logged value is in scaled units: x / norm_factor)
        torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(cfg["width"]), rtol=0, atol=1e-6)
        last = read_metrics(folder / "metrics.jsonl")[-1]
        assert last["step"] == 300 and last["lr"] < 1e-3  # the lr decays over the last 50 steps
        assert float(sae.threshold) == pytest.approx(last["threshold"] * section["norm_factor"], rel=1e-6)


def test_the_sae_learned_and_its_threshold_gives_about_k(trained):
    for cfg in SAES:
        results = json.loads((trained / cfg["name"] / "eval_results.json").read_text())
        assert results["frac_variance_explained_batch_topk"] > 0.8, results
        assert results["l0_batch_topk"] == pytest.approx(cfg["k"], rel=0.01)
        assert results["l0"] == pytest.approx(cfg["k"], rel=0.5)  # the EMA threshold, per token


def test_the_norm_factor_is_saelens_expected_average(trained, cache):
    """norm_factor = mean ||x|| / sqrt(d) over the first n_batches_for_norm_estimate training batches."""
    section = json.loads((trained / "btk" / "config.json").read_text())["workbench"]
    with ActivationCache(cache) as c:
        stream = c.batches(LAYER, 256, seed=0, holdout_fraction=section["holdout_fraction"])
        norms = torch.cat([next(stream).norm(dim=-1) for _ in range(20)])
        expected = norms.mean().item() / c.d_model**0.5
    assert section["norm_factor"] == pytest.approx(expected, rel=1e-6)


def test_the_saelens_export_loads_in_saelens_with_the_same_outputs(trained, tmp_path, cache):
    out = tmp_path / "sl"
    convert(trained / "mat", "saelens", out)
    cfg = json.loads((out / saelens.CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu"
    details = cfg["metadata"]["training_architecture_details"]
    assert details["k"] == 8 and details["matryoshka_widths"] == [32, 128, 256]
    with ActivationCache(cache) as c:
        x_BD = next(c.batches(LAYER, 512, shuffle=False))
    ours = load_trainable(trained / "mat")
    with torch.no_grad():
        f_ours, x_hat_ours = ours.encode(x_BD), ours(x_BD)
    script = ("import sys, torch; from sae_lens import SAE; torch.set_grad_enabled(False); sae = SAE.load_from_disk(sys.argv[1], device='cpu'); "
              "x = torch.load(sys.argv[2]); f = sae.encode(x); torch.save({'f': f, 'x_hat': sae.decode(f)}, sys.argv[3])")
    torch.save(x_BD, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "y.pt", weights_only=True)
    assert_close_to_scale(theirs["f"], f_ours)
    assert_close_to_scale(theirs["x_hat"], x_hat_ours)


def test_resume_after_kill_9_ends_with_the_same_weights(cache, tmp_path):
    short = dict(checkpoint_every=25)
    train(load_recipe(write_recipe(tmp_path / "straight.yaml", cache, tmp_path / "straight", **short)))
    recipe = write_recipe(tmp_path / "killed.yaml", cache, tmp_path / "killed", **short)
    checkpoint = tmp_path / "killed" / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", str(recipe)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < 300
    train(load_recipe(recipe))
    assert not checkpoint.exists()
    for cfg in SAES:
        a = torch.load(tmp_path / "straight" / f"resid_post_layer_{LAYER}" / cfg["name"] / "ae.pt", weights_only=True)
        b = torch.load(checkpoint.parent / cfg["name"] / "ae.pt", weights_only=True)
        for name in a:  # copies restored (weights, Adam, the lr schedule, counters, topk_threshold, reader): bit for bit
            assert torch.equal(a[name], b[name]), name
