"""`workbench run`: the whole pipeline on the embedded model, skipped when done, resumed after kill -9."""

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

from workbench.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]
# recipes/demo.yaml, made small: 128 rows, 150 steps of 256 tokens.
SMALL = [
    "data.num_tokens=16384", "train.batch_size=256", "train.num_tokens=38400", "train.warmup_steps=20",
    "train.threshold_start_step=20", "train.eval_tokens=2048", "train.checkpoint_every=25",
    "threshold.num_tokens=2048", "eval.num_tokens=1024",
]


def run_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "workbench", "run", "recipes/demo.yaml", *SMALL, f"collect.out={out}/cache",
            f"train.out={out}/saes", f"export.out={out}/export", f"features.out={out}/features"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def mtimes(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob(pattern)}


def stages_done(out: Path) -> list[str]:
    path = out / "saes" / "pipeline.json"
    try:
        return list(json.loads(path.read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def run_to_the_end(out: Path) -> Path:
    """The whole (small) pipeline into `out`, which it returns."""
    proc = subprocess.run(run_args(out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return run_to_the_end(tmp_path_factory.mktemp("pipeline"))


def test_run_does_every_stage_and_verifies_both_formats(finished):
    assert stages_done(finished) == list(STAGES)
    dl_folders = sorted((finished / "export" / "dictionary_learning").rglob("ae.pt"))
    sl_folders = sorted((finished / "export" / "saelens").rglob("cfg.json"))
    # 2 layers x (BatchTopK, Matryoshka, Matryoshka with SAELens' algorithm)
    assert len(dl_folders) == 6 and len(sl_folders) == 6
    state = json.loads((finished / "saes" / "pipeline.json").read_text())["stages"]
    assert state["verify"]["verified"] == {"dictionary_learning": 6, "saelens": 6}
    for folder in (finished / "saes").glob("resid_post_layer_*/trainer_*"):
        results = json.loads((folder / "eval_results.json").read_text())
        # trainer keys, threshold re-measurement and the model-spliced evaluation all landed
        assert {"frac_variance_explained", "l0", "frac_recovered", "loss_original", "kl_div"} <= set(results)
        config = json.loads((folder / "config.json").read_text())
        assert config["workbench"]["threshold"]["method"] == "l0"
        assert float(torch.load(folder / "ae.pt", weights_only=True)["threshold"]) > 0
    # the model cards carry the evaluation with the model: frac_recovered and KL of every SAE
    for fmt in ("dictionary_learning", "saelens"):
        card = (finished / "export" / fmt / "README.md").read_text()
        assert "| frac recovered | KL to clean |" in card
        for folder in (finished / "saes").glob("resid_post_layer_*/trainer_*"):
            results = json.loads((folder / "eval_results.json").read_text())
            assert f"| {results['frac_recovered']:.3f} | {results['kl_div']:.4f} |" in card


def test_rerun_skips_every_finished_stage_and_rewrites_nothing(finished):
    before = mtimes(finished, "*.h5") | mtimes(finished, "ae.pt") | mtimes(finished, "*.safetensors")
    proc = subprocess.run(run_args(finished), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:
        assert f"[{stage}] already done" in proc.stdout
    assert before == mtimes(finished, "*.h5") | mtimes(finished, "ae.pt") | mtimes(finished, "*.safetensors")


def test_dry_run_prints_the_plan_without_running(tmp_path):
    proc = subprocess.run([*run_args(tmp_path), "--dry-run"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2, 3" in proc.stdout or "[2, 3]" in proc.stdout  # layers 0.5 and 0.75 of 4
    assert not (tmp_path / "cache").exists() and not (tmp_path / "saes").exists()


# Killing inside train (after collect) is the fast proof; inside eval (after threshold) runs in the slow suite.
@pytest.mark.parametrize("kill_after", ["collect", pytest.param("threshold", marks=pytest.mark.slow)])
def test_kill_9_at_a_stage_then_rerun_finishes_without_redoing_finished_stages(tmp_path, kill_after):
    """Kill the pipeline as soon as `kill_after` is recorded done (so inside the next stage), run the same
    command again: it finishes, and the finished stages are skipped (their files untouched)."""
    proc = subprocess.Popen(run_args(tmp_path), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while kill_after not in stages_done(tmp_path):
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = stages_done(tmp_path)
    assert kill_after in done and len(done) < len(STAGES)  # killed inside a later stage
    shards = mtimes(tmp_path / "cache", "*.h5")

    rerun = subprocess.run(run_args(tmp_path), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in done:
        assert f"[{stage}] already done" in rerun.stdout
    assert stages_done(tmp_path) == list(STAGES)
    assert mtimes(tmp_path / "cache", "*.h5") == shards  # the cache was not collected again
