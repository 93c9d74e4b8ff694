"""`workbench train` when something is wrong: one line on stderr, exit status 2, no traceback, and nothing
already written lost: a planted or outdated checkpoint, a finished SAE of another recipe, an output that
cannot be written (a file in the way, a read-only place, a full disk), a second run on the same
train.out, a loss that turns NaN/Inf, a broken init_from folder or log file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from workbench.cache import ActivationCache
from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.sae import BatchTopKSAE
from workbench.training.loop import check_finite, plan_layer, read_metrics

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
BTK = {"name": "btk", "arch": "batchtopk", "width": 128, "k": 8}
MAT = {"name": "mat", "arch": "matryoshka", "width": 128, "k": 8, "group_fractions": [0.25, 0.75]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """16,384 tokens of the demo corpus through the demo model (layers 2 and 3)."""
    out = tmp_path_factory.mktemp("train_errors_cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=16384",
                                                          "data.context_length=64"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train) -> Path:
    """Layer 2 of `cache` into `out`: 60 steps of 256 tokens, 2048 tokens held out."""
    section = {"cache": str(cache), "layers": [LAYER], "saes": [BTK], "batch_size": 256, "num_tokens": 256 * 60,
               "warmup_steps": 10, "threshold_start_step": 10, "eval_tokens": 2048, "checkpoint_every": 20,
               "out": str(out)} | train
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": section}))
    return path


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> Path:
    """A finished run (k 8): its train.out."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["train", str(write_recipe(root / "recipe.yaml", cache, root / "saes"))]) == 0
    return root / "saes"


def error_line(stderr: str) -> str:
    """The one error line (progress bars aside), checked for form."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("workbench train: error: ")
    return lines[0]


def train_cli(capsys, recipe: Path, *overrides: str) -> tuple[int, str]:
    rc = main(["train", str(recipe), *overrides])
    return rc, capsys.readouterr().err


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the lock file aside: taking it rewrites its holder's name)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def sae_files(out: Path) -> list[str]:
    names = (dl.AE_FILE, dl.CONFIG_FILE, dl.EVAL_FILE, "training_curves.png")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name in names)


class Planted:
    """A pickle that creates `marker` when it is unpickled (what a planted checkpoint.pt would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_planted_checkpoint_is_refused_before_anything_in_it_runs(cache, tmp_path, capsys, form):
    recipe = write_recipe(tmp_path / "r.yaml", cache, tmp_path / "out")
    checkpoint = tmp_path / "out" / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    payload = {"fingerprint": plan_fingerprint(recipe, cache), "step": 3, "trainers": [Planted(marker)]}
    if form == "pickle":
        checkpoint.write_bytes(pickle.dumps(payload, protocol=2))
        pickle.loads(checkpoint.read_bytes())  # the payload works: an unsafe load runs it
    else:
        torch.save(payload, checkpoint)
        torch.load(checkpoint, weights_only=False)
    assert marker.exists()
    marker.unlink()
    planted = checkpoint.read_bytes()

    rc, err = train_cli(capsys, recipe)
    line = error_line(err)
    assert rc == 2 and f"checkpoint {checkpoint} holds objects other than tensors and numbers" in line
    assert "refused without running it" in line and "delete it to start the layer over" in line
    assert not marker.exists()
    assert checkpoint.read_bytes() == planted and sae_files(tmp_path / "out") == []


def plan_fingerprint(recipe: Path, cache: Path) -> str:
    with ActivationCache(cache) as c:
        return plan_layer(load_recipe(recipe), c, LAYER).fingerprint


def test_a_checkpoint_of_an_older_version_or_a_damaged_one_is_refused_with_the_fix(cache, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", cache, tmp_path / "out")
    checkpoint = tmp_path / "out" / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    fp = plan_fingerprint(recipe, cache)
    cases = [  # version 1 pickled numpy's RNG state: the weights-only loader refuses it
        ({"fingerprint": fp, "step": 5, "trainers": [{}], "rng": {"numpy": np.random.get_state()}},
         "holds objects other than tensors and numbers, so it was refused without running it; it was written by an older workbench"),
        ({"fingerprint": fp, "step": 5, "trainers": [{}]}, "is from another workbench version (format 1, this one reads 2)"),
        ({"fingerprint": fp, "step": 5, "version": 2, "trainers": []}, "is from another workbench version"),
        ([1, 2], "is not a workbench training checkpoint"),
    ]
    for state, message in cases:
        torch.save(state, checkpoint)
        rc, err = train_cli(capsys, recipe)
        assert rc == 2 and f"checkpoint {checkpoint} " in error_line(err) and message in error_line(err), state
        assert "delete it to start the layer over" in error_line(err) and checkpoint.is_file()
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    rc, err = train_cli(capsys, recipe)
    assert rc == 2 and f"checkpoint {checkpoint} is unreadable" in error_line(err)
    assert sae_files(tmp_path / "out") == []


def test_a_finished_sae_of_another_recipe_is_refused_and_the_same_recipe_skips(finished, cache, tmp_path, capsys):
    out = tmp_path / "saes"
    shutil.copytree(finished, out)
    before = digests(out)
    folder = out / f"resid_post_layer_{LAYER}" / "btk"
    rc, err = train_cli(capsys, write_recipe(tmp_path / "k16.yaml", cache, out, saes=[BTK | {"k": 16}]))
    line = error_line(err)
    assert rc == 2 and f"{folder} holds a finished SAE made by a different train recipe or cache (k 8 there, 16 here)" in line
    assert "choose another train.out, or delete that SAE folder to train it again; nothing was changed" in line
    assert digests(out) == before

    # An SAE the workbench did not train (no train fingerprint) is not replaced either.
    config = json.loads((folder / dl.CONFIG_FILE).read_text())
    del config["workbench"]
    (folder / dl.CONFIG_FILE).write_text(json.dumps(config))
    foreign = digests(out)
    rc, err = train_cli(capsys, write_recipe(tmp_path / "k8.yaml", cache, out))
    assert rc == 2 and "holds a finished SAE made by a different train recipe" in error_line(err)
    assert digests(out) == foreign

    rc = main(["train", str(write_recipe(tmp_path / "same.yaml", cache, finished))])
    assert rc == 0 and "already trained" in capsys.readouterr().out


def test_a_config_json_that_is_not_an_object_is_one_line(finished, cache, tmp_path, capsys):
    out = tmp_path / "saes"
    shutil.copytree(finished, out)
    config = out / f"resid_post_layer_{LAYER}" / "btk" / dl.CONFIG_FILE
    config.write_text("[1, 2]")
    before = digests(out)
    rc, err = train_cli(capsys, write_recipe(tmp_path / "r.yaml", cache, out))
    assert rc == 2 and f"{config} holds a JSON list, not an object" in error_line(err)
    assert digests(out) == before


def test_an_output_that_cannot_be_written_is_one_line(cache, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err = train_cli(capsys, write_recipe(tmp_path / "r.yaml", cache, blocker / "out"))
    line = error_line(err)
    assert rc == 2 and f"cannot write {blocker / 'out'}" in line and "a parent of it is a file" in line
    assert blocker.read_text() == "not a directory"

    # An SAE's folder name taken by a file inside train.out.
    out = tmp_path / "out"
    (out / f"resid_post_layer_{LAYER}").mkdir(parents=True)
    (out / f"resid_post_layer_{LAYER}" / "btk").write_text("in the way")
    rc, err = train_cli(capsys, write_recipe(tmp_path / "r2.yaml", cache, out))
    assert rc == 2 and f"cannot write {out / f'resid_post_layer_{LAYER}' / 'btk'}" in error_line(err)
    assert (out / f"resid_post_layer_{LAYER}" / "btk").read_text() == "in the way"


def test_a_location_that_refuses_writes_is_one_line(cache, tmp_path, capsys):
    """/sys refuses new directories even to root (chmod cannot show a read-only place to root)."""
    target = Path("/sys/workbench-test/out")
    rc, err = train_cli(capsys, write_recipe(tmp_path / "r.yaml", cache, target))
    assert rc == 2 and "cannot write /sys/workbench-test" in error_line(err)
    assert not target.parent.exists()


def run_cli(args: list[str], prefix: str = "") -> subprocess.Popen:
    """`python -m workbench ...` in its own process; prefix: shell commands before it (e.g. a ulimit)."""
    command = " ".join([sys.executable, "-m", "workbench", *args])
    return subprocess.Popen(["bash", "-c", f"{prefix}exec {command}"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def test_a_full_disk_keeps_the_previous_checkpoint_and_a_rerun_finishes(cache, tmp_path):
    """`ulimit -f` makes a write past the limit fail with EFBIG, as a full disk fails with ENOSPC, and torch.save
    reports it as a RuntimeError. The run is first killed after a checkpoint, with a torn last line in the log
    (what a kill while it is appended leaves); the run under the limit fails to write the next checkpoint."""
    recipe = write_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", saes=[BTK, MAT], num_tokens=256 * 120)
    layer_dir = tmp_path / "out" / f"resid_post_layer_{LAYER}"
    checkpoint = layer_dir / "checkpoint.pt"
    proc = run_cli(["train", str(recipe)])
    wait_for(checkpoint.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(checkpoint, weights_only=True)  # plain tensors and numbers
    assert state["version"] == 2 and 0 < state["step"] < 120 and len(state["trainers"]) == 2
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    size_kib = checkpoint.stat().st_size // 1024
    with open(layer_dir / "btk" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9999, "tok')

    limited = run_cli(["train", str(recipe)], prefix=f"ulimit -f {size_kib // 2}; ")
    _, err = limited.communicate(timeout=300)
    assert limited.returncode == 2, err[-2000:]
    line = error_line(err)
    assert f"cannot write {checkpoint}: " in line and "re-run the same command to resume from the previous checkpoint" in line
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    assert not (layer_dir / "checkpoint.pt.tmp").exists() and sae_files(tmp_path / "out") == []

    resumed = run_cli(["train", str(recipe)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert not checkpoint.exists()
    for name in ("btk", "mat"):
        assert [r["step"] for r in read_metrics(layer_dir / name / "metrics.jsonl")] == list(range(1, 121))
        assert dl.load_folder(layer_dir / name)[0].dict_size == 128


def test_a_second_train_on_the_same_out_fails_at_once(cache, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", num_tokens=256 * 100_000, checkpoint_every=100_000)
    lock = tmp_path / "out" / ".lock"
    first = run_cli(["train", str(recipe)])
    holder = f"workbench train (pid {first.pid})"
    try:
        wait_for(lambda: lock.is_file() and lock.read_text() == holder, first)
        assert first.poll() is None, first.communicate()[1][-2000:]
        start = time.perf_counter()
        rc, err = train_cli(capsys, recipe)
        seconds = time.perf_counter() - start
    finally:
        first.kill()
        first.communicate()
    line = error_line(err)
    assert rc == 2 and f"{tmp_path / 'out'} is in use by {holder}" in line
    assert "wait for it to finish" in line and seconds < 60
    assert lock.read_text() == holder  # the second run did not take it over


def test_a_nan_loss_stops_with_the_layer_sae_and_step_and_writes_no_sae(cache, tmp_path, capsys):
    """A learning rate of 1e30 makes the encoder overflow within two steps (Adam steps ~lr)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", cache, out, lr=1e30, warmup_steps=0, checkpoint_every=1)
    rc, err = train_cli(capsys, recipe)
    line = error_line(err)
    assert rc == 2 and f"layer {LAYER}, SAE btk: the loss became NaN or Inf at step " in line
    assert "lower train.lr" in line and "no SAE file was written" in line
    bad_step = int(line.split(" at step ")[1].split()[0])
    checkpoint = out / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    assert f"the checkpoint {checkpoint} is from before it" in line
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == bad_step - 1  # the last good step: no checkpoint records a NaN
    assert all(torch.isfinite(v).all() for v in state["trainers"][0]["sae"].values() if v.is_floating_point())
    assert sae_files(out) == []


def test_an_sae_with_nan_or_inf_weights_is_never_saved():
    sae = BatchTopKSAE(8, 16, 2)
    check_finite(sae, "ok")  # a fresh SAE passes (threshold -1 is finite)
    with torch.no_grad():
        sae.encoder.bias[3] = float("nan")
        sae.threshold.fill_(float("inf"))
    with pytest.raises(WorkbenchError, match="layer 2, SAE btk: threshold, encoder.bias hold NaN or Inf"):
        check_finite(sae, "layer 2, SAE btk")


def test_init_from_a_damaged_folder_is_one_line(finished, cache, tmp_path, capsys):
    source = finished / f"resid_post_layer_{LAYER}" / "btk"
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    (truncated / dl.AE_FILE).write_bytes((source / dl.AE_FILE).read_bytes()[:1000])
    not_json = tmp_path / "not_json"
    shutil.copytree(source, not_json)
    (not_json / dl.CONFIG_FILE).write_text("{ not json")
    for folder, message in ((truncated, f"{truncated / dl.AE_FILE} is truncated or corrupt"),
                            (not_json, f"{not_json / dl.CONFIG_FILE} is not valid JSON")):
        out = tmp_path / f"out_{folder.name}"
        rc, err = train_cli(capsys, write_recipe(tmp_path / f"{folder.name}.yaml", cache, out, init_from=str(folder)))
        assert rc == 2 and message in error_line(err)
        assert sae_files(out) == []


def test_a_damaged_training_log_is_one_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(WorkbenchError, match=f"{log} line 2 is not JSON; delete the file"):
        read_metrics(log)
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')  # a torn last line: what a kill leaves
    assert read_metrics(log) == [{"step": 1}, {"step": 2}]


def test_a_damaged_pipeline_state_is_one_line(cache, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pipeline.json").write_text("[]")
    rc = main(["run", str(write_recipe(tmp_path / "r.yaml", cache, out)), "--stages", "train"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"workbench run: error: {out / 'pipeline.json'} holds a JSON list, not an object" in err
    assert (out / "pipeline.json").read_text() == "[]" and sae_files(out) == []
