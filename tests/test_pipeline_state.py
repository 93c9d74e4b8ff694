"""The pipeline's state comes from each stage's files (pipeline.json is a log), and under 2 processes a
failure of a per-SAE stage on the main process ends both processes with that error."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import accelerate_two_cpu_processes
from test_pipeline import REPO, env, mtimes, run_args, run_to_the_end

from workbench.formats.output import MARKER


def test_a_per_sae_stage_failing_on_the_main_process_ends_both_processes_with_its_error(tmp_path):
    """The threshold stage runs on the main process only. With no trained SAEs it fails there; the other
    process used to wait at a barrier until the collective timed out (30 minutes). Now both exit with
    status 2 within the launch's time, the other naming the main process's error."""
    cmd, launch_env = accelerate_two_cpu_processes(tmp_path)
    args = run_args(tmp_path)[3:]  # after `python -m workbench`
    proc = subprocess.run([*cmd, *args, "--stages", "threshold"], cwd=REPO, env=launch_env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode != 0  # and it returned: neither process waited for a collective to time out
    missing = f"{tmp_path / 'saes'} is not a directory; give an SAE folder or a folder of them"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("workbench run: error: ")]
    # The other process ends with the main process's error. The main process prints it too, unless the
    # launcher stops it first, as it stops every process once one has failed.
    relayed = f"workbench run: error: the main process failed in the threshold stage: {missing}"
    assert any(line.startswith(relayed) for line in lines), proc.stderr[-3000:]
    assert all(missing in line for line in lines) and 1 <= len(lines) <= 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return run_to_the_end(tmp_path_factory.mktemp("pipeline_state"))


def _rerun(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(run_args(out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_done_comes_from_the_files_not_the_log(finished):
    """Deleting pipeline.json loses nothing: every stage is found done from its own files."""
    (finished / "saes" / "pipeline.json").unlink()
    before = mtimes(finished, "*.h5") | mtimes(finished, "ae.pt") | mtimes(finished, "*.safetensors")
    proc = _rerun(finished)
    for stage in ("collect", "train", "threshold", "eval", "export"):
        assert f"[{stage}] already done (found from its files), skipped" in proc.stdout
    assert "[verify] ..." in proc.stdout  # verify's only record is the log: it checks again, and logs it
    assert before == mtimes(finished, "*.h5") | mtimes(finished, "ae.pt") | mtimes(finished, "*.safetensors")
    assert list(json.loads((finished / "saes" / "pipeline.json").read_text())["stages"]) == ["verify"]


@pytest.mark.slow
def test_a_deleted_export_and_a_deleted_shard_are_redone(finished):
    sl = finished / "export" / "saelens"
    weights = sorted(sl.rglob("sae_weights.safetensors"))[0]
    weights_bytes = weights.read_bytes()
    weights.unlink()
    shard = sorted((finished / "cache").rglob("*.h5"))[0]
    shard_bytes = shard.read_bytes()
    shard.unlink()
    proc = _rerun(finished)
    assert "[collect] ..." in proc.stdout and "[export] ..." in proc.stdout and "[verify] ..." in proc.stdout
    assert "[train] already done" in proc.stdout and "[threshold] already done" in proc.stdout
    assert shard.read_bytes() == shard_bytes  # collection is deterministic: the same shard again
    assert weights.read_bytes() == weights_bytes
    assert json.loads((sl / MARKER).read_text())["complete"] is True


@pytest.mark.slow
def test_a_deleted_sae_folder_is_trained_again(finished):
    folder = finished / "saes" / "resid_post_layer_2" / "trainer_0"
    ae = (folder / "ae.pt").read_bytes()
    shutil.rmtree(folder)
    proc = _rerun(finished)
    assert "[collect] already done" in proc.stdout
    for stage in ("train", "threshold", "eval", "export", "verify"):
        assert f"[{stage}] ..." in proc.stdout
    # retrained from the start and re-calibrated: the same SAE as before (same code, threads, data)
    assert (folder / "ae.pt").read_bytes() == ae


def test_a_truncated_ae_pt_is_not_a_finished_sae(tmp_path):
    """is_trained / train's own check: a folder whose ae.pt is cut short is trained again, not skipped."""
    from workbench.config import load_recipe
    from workbench.training import is_trained

    out = tmp_path
    proc = subprocess.run([*run_args(out), "--stages", "collect,train"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = load_recipe(str(REPO / "recipes" / "demo.yaml"), run_args(out)[5:])
    assert is_trained(recipe)
    ae = out / "saes" / "resid_post_layer_3" / "trainer_1" / "ae.pt"
    ae.write_bytes(ae.read_bytes()[:1000])
    assert not is_trained(recipe)
