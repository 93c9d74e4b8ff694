"""The JumpReLU threshold: the three estimators, exact on synthetic data, and the proof on SAEs trained by
`workbench train` on a demo cache: JumpReLU L0 within 10% of k (`l0` exact) and FVE within 1% of batch-top-k
inference for the batch-min and l0 thresholds; the training EMA is reported next to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.sae import BatchTopKSAE
from workbench.threshold import calibrate, derive_thresholds, evaluate_thresholds

REPO = Path(__file__).resolve().parents[1]
LAYER, WIDTH, K = 2, 256, 8


def identity_sae(n: int, k: int) -> BatchTopKSAE:
    """pre_acts(x) = relu(x) and decode(f) = f: the estimators then act on known numbers."""
    sae = BatchTopKSAE(n, n, k)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(n))
        sae.decoder.weight.copy_(torch.eye(n))
        sae.encoder.bias.zero_()
    return sae


def test_estimators_are_exact_on_known_preactivations():
    g = torch.Generator().manual_seed(0)
    k, n = 3, 40
    data = [torch.rand(16, n, generator=g) for _ in range(5)] + [torch.zeros(16, n)]  # last batch: nothing positive
    sae = identity_sae(n, k)
    with torch.no_grad():
        found, n_tokens = derive_thresholds(sae, lambda: iter(data), max_tokens=96, device=torch.device("cpu"))
    everything = torch.cat(data).flatten()
    assert n_tokens == 96
    assert int((everything > found["l0"]).sum()) == k * n_tokens  # mean L0 exactly k
    per_batch_min = [b.flatten().topk(k * 16).values.min() for b in data[:-1]]  # the empty batch adds nothing
    assert found["batch-min"] == pytest.approx(float(torch.stack(per_batch_min).mean()), rel=1e-6)


def test_jumprelu_l0_at_the_l0_threshold_is_k_and_batch_top_k_is_k():
    g = torch.Generator().manual_seed(1)
    k, n = 4, 64
    data = [torch.randn(32, n, generator=g) for _ in range(4)]
    sae = identity_sae(n, k)
    with torch.no_grad():
        found, _ = derive_thresholds(sae, lambda: iter(data), max_tokens=128, device=torch.device("cpu"))
        per_method, (btk_l0, _), fired = evaluate_thresholds(sae, lambda: iter(data), found, "l0", torch.device("cpu"))
    assert per_method["l0"][0] == pytest.approx(k) and btk_l0 == pytest.approx(k)
    assert int(fired.sum()) == k * 128


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=16384"]))
    return out


@pytest.fixture(scope="module")
def demo_saes(demo_cache, tmp_path_factory) -> dict[str, Path]:
    """A BatchTopK and a Matryoshka SAE trained by `workbench train` on the demo cache (200 steps)."""
    run = tmp_path_factory.mktemp("run")
    saes = (f"[{{name: batchtopk, arch: batchtopk, width: {WIDTH}, k: {K}}}, "
            f"{{name: matryoshka, arch: matryoshka, width: {WIDTH}, k: {K}, group_fractions: [0.125, 0.25, 0.625]}}]")
    assert main(["train", str(REPO / "recipes" / "demo.yaml"), f"collect.out={demo_cache}", f"train.out={run}",
                 f"train.layers=[{LAYER}]", f"train.saes={saes}", "train.num_tokens=102400", "train.batch_size=512",
                 "train.warmup_steps=20", "train.threshold_start_step=50", "train.eval_tokens=4096",
                 "train.checkpoint_every=1000"]) == 0
    return {arch: run / f"resid_post_layer_{LAYER}" / arch for arch in ("batchtopk", "matryoshka")}


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_threshold_methods_on_a_trained_demo_sae(demo_saes, arch, capsys):
    report = calibrate(demo_saes[arch], batch_size=512, num_tokens=4096, write=False)
    print(f"\n{arch}: batch-top-k L0 {report.batch_topk_l0:.2f} FVE {report.batch_topk_fve:.4f}; " + "; ".join(
        f"{m.method} threshold {m.threshold:.5g} L0 {m.l0:.2f} FVE {m.fve:.4f}" for m in report.methods))
    assert report.split == "holdout" and 3072 <= report.num_tokens <= 4096  # the held-out blocks end the cache
    assert report.batch_topk_l0 == pytest.approx(K)
    assert report.batch_topk_fve > 0.5  # a sensible fit, not noise
    for method in ("batch-min", "l0"):
        m = report.result(method)
        assert abs(m.l0 - K) <= 0.1 * K, m
        assert abs(m.fve - report.batch_topk_fve) <= 0.01, m
    assert report.result("l0").l0 == pytest.approx(K, abs=1e-3)
    # The training EMA is reported as is: after 150 EMA steps with beta 0.999 it still remembers the
    # early, larger thresholds (so its L0 runs low); it is what the checkpoint holds.
    ema = report.result("ema")
    assert ema.threshold == pytest.approx(float(dl.load_state_dict(demo_saes[arch] / dl.AE_FILE)["threshold"]))
    assert 0 < ema.l0 < K


def test_threshold_is_written_with_its_history(demo_saes, capsys):
    folder = demo_saes["batchtopk"]
    before = float(dl.load_state_dict(folder / dl.AE_FILE)["threshold"])
    assert main(["threshold", str(folder), "--method", "l0", "--batch-size", "512", "--num-tokens", "4096"]) == 0
    printed = capsys.readouterr().out
    assert "batch-top-k" in printed and "<- chosen" in printed and "wrote threshold" in printed
    config = json.loads((folder / dl.CONFIG_FILE).read_text())
    record = config["workbench"]["threshold"]
    state = dl.load_state_dict(folder / dl.AE_FILE)
    assert float(state["threshold"]) == pytest.approx(record["value"]) and record["method"] == "l0"
    assert record["previous"] == {"threshold": pytest.approx(before), "method": "ema"}
    assert record["batch_size"] == 512 and record["split"] == "holdout"
    assert set(record["report"]) == {"ema", "batch-min", "l0", "batch_topk"}
    evals = json.loads((folder / dl.EVAL_FILE).read_text())  # re-measured at the new threshold
    assert evals["l0"] == pytest.approx(K, abs=1e-3) and evals["frac_variance_explained"] > 0.5
    assert set(evals) >= {"l2_loss", "l1_loss", "cossim", "l2_ratio", "relative_reconstruction_bias", "frac_alive"}
    assert record["ema"] == pytest.approx(before)
    sparsity = load_file(str(folder / dl.SPARSITY_FILE))["sparsity"]
    assert sparsity.shape == (WIDTH,) and float((10 ** sparsity).sum()) == pytest.approx(K, rel=1e-3)
    # A second run records the first as the previous threshold.
    calibrate(folder, method="batch-min", batch_size=512, num_tokens=4096)
    again = json.loads((folder / dl.CONFIG_FILE).read_text())["workbench"]["threshold"]
    assert again["method"] == "batch-min" and again["previous"]["method"] == "l0"
    assert again["previous"]["threshold"] == pytest.approx(record["value"])
    assert again["ema"] == pytest.approx(before) and again["report"]["ema"]["threshold"] == pytest.approx(before)
    assert config["trainer"] == json.loads((folder / dl.CONFIG_FILE).read_text())["trainer"]


def test_uncalibrated_checkpoint_has_no_ema_estimate(demo_saes, tmp_path):
    sae, config = dl.load_folder(demo_saes["matryoshka"])
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    dl.save_folder(sae, tmp_path / "sae", config)
    with pytest.raises(WorkbenchError, match="never set in training"):
        calibrate(tmp_path / "sae", method="ema", batch_size=512, num_tokens=4096)
    report = calibrate(tmp_path / "sae", method="l0", batch_size=512, num_tokens=4096)
    assert report.result("ema").threshold is None and report.previous["method"] == "unset"


def test_threshold_needs_a_cache_with_the_layer(demo_saes, tmp_path, demo_cache):
    sae, config = dl.load_folder(demo_saes["batchtopk"])
    del config["workbench"]["cache"]
    dl.save_folder(sae, tmp_path / "sae", config)
    with pytest.raises(WorkbenchError, match="records no cache"):
        calibrate(tmp_path / "sae", write=False)
    config["trainer"]["layer"] = 1
    dl.save_folder(sae, tmp_path / "sae", config)
    with pytest.raises(WorkbenchError, match="has no layer 1"):
        calibrate(tmp_path / "sae", cache=demo_cache, write=False)
