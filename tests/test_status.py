"""`workbench status RECIPE|RUN`: each stage done / running / stopped / failed / not started, the checkpoint step of
the planned steps, the shards and the disk used, from the files, while the pipeline runs and after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench.cli import main
from workbench.config import load_recipe
from workbench.pipeline import STAGES
from workbench.status import status

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "demo.yaml")
# recipes/demo.yaml made small: 128 rows (one shard), 60 steps of 256 tokens on one layer, a checkpoint every 20.
SMALL = [
    "data.num_tokens=16384", "train.batch_size=256", "train.num_tokens=15360", "train.warmup_steps=10",
    "train.threshold_start_step=10", "train.eval_tokens=2048", "train.checkpoint_every=20", "train.layers=[2]",
    "features.out=null",
]
STEPS = 60


def overrides(out: Path) -> list[str]:
    return [*SMALL, f"collect.out={out}/cache", f"train.out={out}/saes", f"export.out={out}/export"]


def run_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "workbench", "run", RECIPE, "--stages", "collect,train", *overrides(out)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def states(st) -> dict[str, str]:
    return {s.stage: s.state for s in st.stages}


def test_status_while_training_after_a_kill_9_and_when_finished(tmp_path, capsys):
    checkpoint = tmp_path / "saes" / "resid_post_layer_2" / "checkpoint.pt"
    proc = subprocess.Popen(run_args(tmp_path), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.is_file():
            assert proc.poll() is None, "the pipeline ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen mid-train: it still holds train.out's lock
        step = int(torch.load(checkpoint, weights_only=True)["step"])
        assert step % 20 == 0 and 0 < step < STEPS
        running = status(RECIPE, overrides(tmp_path))
        assert states(running) == {"collect": "done", "train": "running", "threshold": "not started",
                                   "eval": "not started", "export": "not started", "verify": "not started",
                                   "features": "not asked for"}
        assert running.layers == {2: (step, STEPS)} and running.shards == (1, 1)
        assert running.disk["cache"] == du(tmp_path / "cache") > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    stopped = status(RECIPE, overrides(tmp_path))
    assert stopped.of("train").state == "stopped" and stopped.layers == {2: (step, STEPS)}
    assert f"layer 2: step {step} of {STEPS} (checkpoint)" in stopped.of("train").detail
    assert main(["status", RECIPE, *overrides(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  train      stopped" in out and f"cache {du(tmp_path / 'cache'):,} bytes" not in out  # MiB-sized
    assert f"({du(tmp_path / 'cache'):,} bytes)" in out
    run = status(str(tmp_path / "saes"))  # the run folder alone
    assert run.of("collect").state == "done" and run.of("train").state == "stopped" and run.layers == {2: (step, None)}

    finished = subprocess.run(run_args(tmp_path), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    done = status(RECIPE, overrides(tmp_path))
    assert [done.of(s).state for s in STAGES] == ["done", "done", *["not started"] * 4, "not asked for"]
    assert done.layers == {2: (STEPS, STEPS)} and done.shards == (1, 1) and done.failed is None
    assert done.disk == {"cache": du(tmp_path / "cache"), "run": du(tmp_path / "saes"), "export": 0}
    assert not checkpoint.exists()
    assert main(["status", str(tmp_path / "saes")]) == 0
    out = capsys.readouterr().out
    assert "  train      done          logged " in out and "  threshold  not logged" in out


def test_a_failed_stage_is_logged_and_reported_with_its_error(tmp_path, capsys):
    """The train stage without a cache fails with a WorkbenchError: pipeline.json records it, status shows it."""
    args = ["run", RECIPE, "--stages", "train", *overrides(tmp_path)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().removeprefix("workbench run: error: ")
    st = status(RECIPE, overrides(tmp_path))
    assert st.of("train").state == "failed" and st.of("collect").state == "not started"
    assert st.failed is not None and st.failed["stage"] == "train" and st.failed["error"] == error
    assert main(["status", RECIPE, *overrides(tmp_path)]) == 0
    assert f"last error: [train] {error} (" in capsys.readouterr().out
    recipe = load_recipe(RECIPE, overrides(tmp_path))
    assert not Path(recipe.collect.out).exists()  # status created nothing


def test_status_of_nothing_is_one_line_exit_2(tmp_path, capsys):
    assert main(["status", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is neither a recipe file nor a run folder" in err and err.count("\n") == 1


def test_a_per_sae_stage_reads_running_while_it_runs_and_a_second_pipeline_is_refused(tmp_path, capsys):
    """The per-SAE stages write into the SAE folders under no lock of collect's or train's: the pipeline
    holds <train.out>/.stage/.lock naming the stage while one runs, which status reads (for the recipe and
    for the run folder alone), and which makes a second pipeline fail at once."""
    from workbench.errors import WorkbenchError
    from workbench.pipeline import run_stage_locked

    recipe = load_recipe(RECIPE, overrides(tmp_path))
    Path(recipe.train.out).mkdir(parents=True)  # made by training; with no train.out there is nothing to guard
    seen = {}

    def work() -> dict:
        seen["recipe"] = states(status(RECIPE, overrides(tmp_path)))
        seen["run"] = states(status(recipe.train.out))
        try:
            run_stage_locked(recipe, "eval", lambda: {})
        except WorkbenchError as err:
            seen["second"] = str(err)
        return {}

    run_stage_locked(recipe, "threshold", work)
    assert seen["recipe"]["threshold"] == "running" and seen["recipe"]["eval"] == "not started"
    assert seen["run"]["threshold"] == "running" and seen["run"]["eval"] == "not logged"
    assert "is in use by workbench run, threshold stage (pid" in seen["second"]
    assert states(status(RECIPE, overrides(tmp_path)))["threshold"] == "not started"  # released when it ends
