"""Experiment trackers (recipe section `tracking`): a demo-sized collection and training with TensorBoard
and wandb (offline) write real runs, read back with each tracker's own reader, holding every metric the
workbench computes at the steps metrics.jsonl records; a missing tracker package and a bad name are one
line; only the main process of two writes; a resumed layer's TensorBoard run holds each step once."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, accelerate_two_cpu_processes

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.tracking import check_trackers
from workbench.training.loop import read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")

SAES = [{"name": "btk", "arch": "batchtopk", "width": 128, "k": 8},
        {"name": "mat", "arch": "matryoshka", "width": 128, "k": 8, "group_fractions": [0.25, 0.75]}]
STEPS = 100
TRAIN_KEYS = {"loss", "mse", "auxk_loss", "l0", "frac_variance_explained", "dead", "dead_fraction", "threshold", "lr",
              "k", "tokens_per_s"}
EVAL_KEYS = {"l0", "frac_variance_explained", "mse", "l0_batch_topk", "frac_variance_explained_batch_topk"}


def write_recipe(root: Path, log_with: list[str], **train) -> Path:
    """The demo recipe, shrunk: 16,384 tokens collected, layer 2 trained for STEPS steps of 256 tokens."""
    section = {"layers": [2], "saes": SAES, "batch_size": 256, "num_tokens": 256 * STEPS, "warmup_steps": 10,
               "threshold_start_step": 10, "eval_tokens": 2048, "checkpoint_every": 1000, "out": str(root / "saes")}
    recipe = {"base": str(REPO / "recipes" / "demo.yaml"), "data": {"num_tokens": 16384, "context_length": 64},
              "collect": {"out": str(root / "cache")}, "train": section | train,
              "tracking": {"log_with": log_with, "run": "t"}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """Collection and training of the shrunk demo with both trackers, wandb offline."""
    root = tmp_path_factory.mktemp("tracked")
    recipe = load_recipe(write_recipe(root, ["tensorboard", "wandb"]))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        collect(recipe)
        train(recipe)
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return root


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder, read with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_runs(folder: Path) -> dict[str, list[dict]]:
    """The history rows of each offline wandb run under folder/wandb, by run name, read from its .wandb
    transaction log: the LevelDB log format (7-byte file header, 32 KiB blocks, records of crc32, length,
    type: full / first / middle / last) holding wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending, name, rows = path.read_bytes(), 7, b"", None, []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:
                pos += left
                continue
            pending = (pending if kind in (3, 4) else b"") + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "run":
                    name = record.run.display_name
                elif record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
        runs[name] = rows
    return runs


def test_tensorboard_holds_every_metric_at_every_log_step(tracked):
    scalars = tensorboard_scalars(tracked / "saes" / "trackers" / "sae-workbench" / "t" / "layer_2")
    for sae in SAES:
        rows = read_metrics(tracked / "saes" / "resid_post_layer_2" / sae["name"] / "metrics.jsonl")
        assert len(rows) == STEPS  # log_every is 1 below 500 steps
        for key in TRAIN_KEYS:
            logged = scalars[f"{sae['name']}/{key}"]
            assert [step for step, _ in logged] == [row["step"] for row in rows] == list(range(1, STEPS + 1))
            expected = [row["dead"] / sae["width"] if key == "dead_fraction" else row[key] for row in rows]
            # TensorBoard stores float32.
            assert all(math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-30) for (_, v), e in zip(logged, expected, strict=True)), key
        results = json.loads((tracked / "saes" / "resid_post_layer_2" / sae["name"] / "eval_results.json").read_text())
        for key in EVAL_KEYS:
            (step, value), = scalars[f"{sae['name']}/eval/{key}"]
            assert step == STEPS and math.isclose(value, results[key], rel_tol=1e-6), key


def test_tensorboard_holds_the_collection_statistics(tracked):
    scalars = tensorboard_scalars(tracked / "saes" / "trackers" / "sae-workbench" / "t" / "collect")
    manifest = json.loads((tracked / "cache" / "manifest.json").read_text())
    tokens = manifest["summary"]["tokens"]
    assert scalars["tokens"] == [(len(manifest["shards"]), tokens)]
    for layer in ("2", "3"):
        stats = manifest["summary"]["layers"][layer]
        assert stats["sink"] > 0
        assert math.isclose(scalars[f"layer_{layer}/sink_rate"][0][1], stats["sink"] / tokens, rel_tol=1e-6)
        assert math.isclose(scalars[f"layer_{layer}/first_token_rate"][0][1], stats["first_token"] / tokens, rel_tol=1e-6)
    assert scalars["tokens_per_s"][0][1] > 0


def test_wandb_offline_run_holds_the_same_metrics(tracked):
    runs = wandb_runs(tracked / "saes" / "trackers")
    assert set(runs) == {"t/collect", "t/layer_2"}
    history = {row["_step"]: row for row in runs["t/layer_2"]}
    assert sorted(history) == list(range(1, STEPS + 1))
    for sae in SAES:
        for row in read_metrics(tracked / "saes" / "resid_post_layer_2" / sae["name"] / "metrics.jsonl"):
            logged = history[row["step"]]
            for key in TRAIN_KEYS - {"dead_fraction"}:
                assert logged[f"{sae['name']}/{key}"] == row[key], key  # JSON both ways: the same float
            assert logged[f"{sae['name']}/dead_fraction"] == row["dead"] / sae["width"]
        results = json.loads((tracked / "saes" / "resid_post_layer_2" / sae["name"] / "eval_results.json").read_text())
        assert all(history[STEPS][f"{sae['name']}/eval/{key}"] == results[key] for key in EVAL_KEYS)
    (collect_row,) = runs["t/collect"]
    manifest = json.loads((tracked / "cache" / "manifest.json").read_text())
    assert collect_row["tokens"] == manifest["summary"]["tokens"]


def test_trackers_are_off_by_default_and_write_nothing(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    assert recipe.tracking.log_with == []
    recipe = load_recipe(write_recipe(tmp_path, [], num_tokens=256 * 20))
    collect(recipe)
    train(recipe)
    assert (tmp_path / "saes" / "resid_post_layer_2" / "btk" / "ae.pt").is_file()
    assert not (tmp_path / "saes" / "trackers").exists()


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, ["tensorboard"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets where it is not installed
    with pytest.raises(WorkbenchError, match=r"tensorboard, which is not installed; install the extra: "
                                             r"pip install 'sae-workbench\[tensorboard\]'"):
        check_trackers(load_recipe(path))
    assert main(["collect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sae-workbench[tensorboard]" in err
    assert not (tmp_path / "cache").exists()  # refused before anything was written


@pytest.mark.parametrize(("log_with", "message"), [
    (["mlflow"], "tracking.log_with entry must be one of tensorboard, wandb (got 'mlflow')"),
    (["wandb", "wandb"], "tracking.log_with lists a tracker twice"),
])
def test_a_bad_tracker_name_is_refused(tmp_path, log_with, message):
    with pytest.raises(WorkbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write_recipe(tmp_path, log_with))


@pytest.mark.slow
def test_only_the_main_process_of_two_logs(tmp_path):
    path = write_recipe(tmp_path, ["tensorboard"], num_tokens=256 * 40)
    collect(load_recipe(path))
    launch, env = accelerate_two_cpu_processes(tmp_path)
    proc = subprocess.run([*launch, "train", str(path)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "saes" / "trackers" / "sae-workbench" / "t" / "layer_2"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in tensorboard_scalars(run)["btk/loss"]] == list(range(1, 41))


@pytest.mark.slow
def test_a_resumed_layer_logs_each_step_once(tmp_path):
    path = write_recipe(tmp_path, ["tensorboard"], num_tokens=256 * 300, checkpoint_every=25)
    collect(load_recipe(path))
    checkpoint = tmp_path / "saes" / "resid_post_layer_2" / "checkpoint.pt"
    run = tmp_path / "saes" / "trackers" / "sae-workbench" / "t" / "layer_2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # steps after the checkpoint reach the event file before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert subprocess.run([sys.executable, "-m", "workbench", "train", str(path)], cwd=REPO, env=env,
                          capture_output=True).returncode == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in tensorboard_scalars(run)["btk/loss"]] == list(range(1, 301))
