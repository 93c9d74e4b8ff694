"""The cache as a bounded buffer (collect.max_shards_on_disk): collection and training at the same time, each
shard deleted once training released it, and SAEs that depend only on the recipe and the data: not on which
side started first, how far collection got ahead, the number of training processes, or kill -9 of either side
followed by the same commands again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import accelerate_two_cpu_processes

from workbench.cache import ActivationCache, buffer
from workbench.cache.layout import shard_name
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.training import train

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
SHARDS = 32  # 8 rows of 64 tokens a shard

pytestmark = pytest.mark.usefixtures("one_thread")


def write_recipe(tmp: Path, name: str = "run", max_shards: int = 4, **train_keys) -> Path:
    """The demo-stream recipe at test size: one layer, one small SAE, 32 shards of 512 tokens, windows of 2 (not
    normalised: dictionary_learning samples 100 batches for it, 25 of these shards; the demo-stream run does)."""
    section = {"layers": [LAYER], "saes": [{"name": "btk", "arch": "batchtopk", "width": 128, "k": 8}],
               "batch_size": 128, "num_tokens": 7680, "warmup_steps": 10, "threshold_start_step": 20,
               "eval_tokens": 256, "checkpoint_every": 20, "shuffle_shards": 2, "data_lanes": 2,
               "normalize_activations": False, "out": str(tmp / name / "saes")} | train_keys
    recipe = {"base": str(REPO / "recipes" / "demo-stream.yaml"),
              "data": {"num_tokens": 64 * 8 * SHARDS, "context_length": 64},
              "collect": {"layers": [LAYER], "batch_size": 8, "shard_batches": 1, "max_shards_on_disk": max_shards,
                          "holdout_shards": 1, "out": str(tmp / name / "cache")},
              "train": section}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def command(which: str, recipe: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, WORKBENCH_STALL_SECONDS="2", WORKBENCH_PROGRESS_EVERY="1000", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "workbench", which, str(recipe), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    errors = "\n".join(line for line in out.splitlines() if "workbench" in line and "error:" in line)
    assert proc.returncode == 0, f"{errors}\n{out[-3000:]}"  # the one-line errors first: a peer's traceback follows them
    return out


def weights(recipe: Path) -> dict[str, torch.Tensor]:
    t = load_recipe(recipe).train
    return torch.load(Path(t.out) / f"resid_post_layer_{LAYER}" / "btk" / "ae.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Collection first, alone, in a buffer big enough to hold everything, then training: the result every
    other order and interruption must reproduce."""
    tmp = tmp_path_factory.mktemp("buffer_reference")
    recipe = write_recipe(tmp, max_shards=64)
    finish(command("collect", recipe))
    assert len(buffer.written(load_recipe(recipe).collect.out)) == SHARDS  # nothing released yet
    train(load_recipe(recipe))
    return recipe


def test_training_first_with_a_small_buffer_equals_collection_first(reference, tmp_path):
    """Training starts before the cache exists and waits (saying so); collection waits on a full buffer of 4
    shards (saying so); the SAE is bit-identical to collect-then-train, and only the held-out shard is left."""
    recipe = write_recipe(tmp_path)
    trainer = command("train", recipe)
    time.sleep(3)
    collector = command("collect", recipe)
    train_log, collect_log = finish(trainer), finish(collector)
    assert "train: waiting since" in train_log and "to be created" in train_log
    assert "collect: waiting since" in collect_log and "for training to release shards" in collect_log
    got, want = weights(recipe), weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    cache = Path(load_recipe(recipe).collect.out)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and buffer.written(cache) == [0]
    assert sorted(int(i) for i in manifest["released"]) == list(range(1, SHARDS))
    with ActivationCache(cache) as held_out:  # what eval_results, the threshold and eval read: shard 0
        assert [p.name for p in held_out.shards] == [Path(shard_name(0)).name]
    config = json.loads((Path(load_recipe(recipe).train.out) / f"resid_post_layer_{LAYER}" / "btk" / "config.json").read_text())
    assert config["workbench"]["holdout_fraction"] is None and config["buffer"]["n_ctxs"] == 2 * 8


def test_workbench_run_streams_collection_and_training(reference, tmp_path):
    """`workbench run` with the key set starts both at once and logs both stages; the SAE is the same."""
    recipe = write_recipe(tmp_path)
    out = finish(command("run", recipe, "--stages", "collect,train"))
    assert "[collect] ..." in out and "[train] already done" in out
    got, want = weights(recipe), weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    log = json.loads((Path(load_recipe(recipe).train.out) / "pipeline.json").read_text())
    assert {"collect", "train"} <= set(log["stages"])


def test_kill_of_either_side_then_the_same_commands(reference, tmp_path):
    """kill -9 of the trainer after a checkpoint, and of the collector while it writes into the room that
    checkpoint released, then the same two commands: the SAE is bit-identical to the uninterrupted one."""
    recipe = write_recipe(tmp_path)
    cache = Path(load_recipe(recipe).collect.out)
    checkpoint = Path(load_recipe(recipe).train.out) / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    collector, trainer = command("collect", recipe), command("train", recipe)
    deadline = time.time() + 240
    while not checkpoint.is_file() and time.time() < deadline:
        time.sleep(0.05)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    assert checkpoint.is_file()
    written = len(buffer.written(cache))
    while len(buffer.written(cache)) == written and collector.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the collector goes on into the room the checkpoint released, and is killed there
    collector.send_signal(signal.SIGKILL)
    collector.wait()
    collector, trainer = command("collect", recipe), command("train", recipe)
    finish(collector), finish(trainer)
    got, want = weights(recipe), weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_trainers_of_disjoint_layers_share_a_buffer(reference, tmp_path):
    """Layers 2 and 3 collected into one 4-shard buffer, each trained by its own `workbench train` (its own
    train.out): a shard is deleted only once both released it, and layer 2's SAE is bit-identical to the
    one trained alone."""
    recipe = write_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["collect"]["layers"] = [2, 3]
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    trainers = [command("train", recipe, f"train.layers=[{layer}]", f"train.out={run / f'saes_{layer}'}") for layer in (2, 3)]
    collector = command("collect", recipe)
    for proc in (*trainers, collector):
        finish(proc)
    got = torch.load(run / "saes_2" / f"resid_post_layer_{LAYER}" / "btk" / "ae.pt", weights_only=True)
    want = weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    cache = Path(load_recipe(recipe).collect.out)
    assert buffer.written(cache) == [0]
    assert all(buffer.released_below(cache, layer) == buffer.DONE for layer in (2, 3))


def test_two_processes_on_each_side_equal_one(reference, tmp_path):
    """Collection and training each under accelerate launch with 2 processes, at the same time: the same
    shards as one collecting process, and the same SAE as one training process to the 2-process training
    test's tolerance (the gradients are averaged in another order)."""
    recipe = write_recipe(tmp_path)
    launched = []
    for which in ("train", "collect"):
        (tmp_path / which).mkdir()
        prefix, env = accelerate_two_cpu_processes(tmp_path / which)
        env |= {"WORKBENCH_STALL_SECONDS": "2", "OMP_NUM_THREADS": "1"}
        launched.append(subprocess.Popen([*prefix, which, str(recipe)], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    for proc in launched:
        finish(proc, timeout=900)
    got, want = weights(recipe), weights(reference)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)  # as tests/test_train.py
    with h5py.File(Path(load_recipe(recipe).collect.out) / shard_name(0), "r") as mine, \
            h5py.File(Path(load_recipe(reference).collect.out) / shard_name(0), "r") as theirs:
        assert np.array_equal(mine[f"layer_{LAYER}/activations"][:], theirs[f"layer_{LAYER}/activations"][:])


def test_errors_are_one_line_and_keep_the_buffer(reference, tmp_path):
    """A buffer smaller than two shuffle windows; a training recipe that does not match the buffer being
    written; a second trainer of the same layer: each one line, nothing deleted."""
    with pytest.raises(WorkbenchError, match=r"max_shards_on_disk \(3\) is smaller than twice train.shuffle_shards"):
        load_recipe(write_recipe(tmp_path, max_shards=3))
    cache = load_recipe(reference).collect.out
    before = buffer.written(cache)
    other = write_recipe(tmp_path, name="other", max_shards=64)
    with pytest.raises(WorkbenchError, match="being written by a different recipe"):
        train(load_recipe(other, [f"collect.out={cache}", "collect.sink_multiple=20"]))
    with pytest.raises(WorkbenchError, match=r"train.layers \[3\] are not in the buffer"):
        train(load_recipe(other, [f"collect.out={cache}", "train.layers=[3]"]))
    trained = json.loads(buffer.consumer_path(Path(cache), LAYER).read_text())["fingerprint"]
    with buffer.claim_layer(Path(cache), LAYER, trained, "elsewhere"):  # as a running `workbench train` holds it
        with pytest.raises(WorkbenchError, match=f"layer {LAYER} of the buffer at .* is already being trained"):
            train(load_recipe(other, [f"collect.out={cache}"]))
    assert buffer.written(cache) == before
    with pytest.raises(WorkbenchError, match=f"layer {LAYER} of the buffer at .* was consumed to its end by another training"):
        train(load_recipe(other, [f"collect.out={cache}", "train.saes[0].k=4"]))


def test_plan_prints_the_disk_of_both_modes(tmp_path):
    """`workbench plan`: the whole cache, and the bounded buffer's most, (N + held out + 1 writer) x shard."""
    from workbench.plan import plan, render

    p = plan(load_recipe(write_recipe(tmp_path, max_shards=6)))
    assert p.shards == SHARDS and p.buffer_set and p.buffer_shards == 6
    assert p.buffer_bytes() == (6 + 1 + 1) * p.shard_bytes and p.buffer_bytes(3) == (6 + 1 + 3) * p.shard_bytes
    text = render(p)
    assert "cache      " in text and "as a bounded buffer (collect.max_shards_on_disk 6, 1 held-out shard(s))" in text
    unbounded = plan(load_recipe(REPO / "recipes" / "qwen3-8b-batchtopk.yaml"))
    assert not unbounded.buffer_set and unbounded.buffer_shards == 32  # 8-shard windows, two of them + 1000 steps' two
    assert "if collect.max_shards_on_disk were 32" in render(unbounded)


def test_device_split_flags_are_checked(capsys):
    """--collect-devices/--train-devices: both or neither, CUDA device numbers, and only with a bounded cache."""
    from workbench.cli import main

    def run(*args: str) -> str:
        assert main(["run", str(REPO / "recipes" / "demo.yaml"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "give both --collect-devices and --train-devices" in run("--collect-devices", "0")
    assert "set collect.max_shards_on_disk" in run("--collect-devices", "0,1", "--train-devices", "2")
    assert "not a comma-separated list of distinct CUDA device numbers" in run("--collect-devices", "0,x", "--train-devices", "2")


@pytest.mark.slow  # the waiting lines themselves are asserted by the fast test_training_first_...
def test_a_waiting_trainer_says_so_and_stops_on_ctrl_c(tmp_path):
    """No collector running: the trainer waits for the next shard, prints what it waits for and since when,
    and Ctrl-C ends it at once (its reader thread stops waiting) with the usual line and exit 130."""
    recipe = write_recipe(tmp_path)
    cache = Path(load_recipe(recipe).collect.out)
    collector, trainer = command("collect", recipe), command("train", recipe)
    deadline = time.time() + 240
    while len(buffer.written(cache)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    collector.kill()
    collector.wait()
    log = Path(load_recipe(recipe).train.out) / f"resid_post_layer_{LAYER}" / "btk" / "metrics.jsonl"
    while not log.is_file() and time.time() < deadline:  # training has started on the shards there are
        time.sleep(0.05)
    time.sleep(5)  # WORKBENCH_STALL_SECONDS=2: a line every 2 s while it waits
    trainer.send_signal(signal.SIGINT)
    out, _ = trainer.communicate(timeout=60)
    assert trainer.returncode == 130, out[-2000:]
    assert "workbench train: interrupted; re-run the same command to resume" in out
    assert "train: waiting since" in out and "for shard" in out and "no collector has written it yet" in out
