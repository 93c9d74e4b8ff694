"""Crash safety: kill -9 then resume, partial shards, damaged shards, re-runs and foreign caches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from workbench.cache import ActivationCache
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError

REPO = Path(__file__).resolve().parents[1]
# 24 batches of 2 rows of 64 tokens, one batch a shard: 24 shards.
OVERRIDES = ["data.context_length=64", "data.num_tokens=3072", "collect.batch_size=2", "collect.shard_batches=1",
             "collect.layers=[1,3]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _collect(out: Path, *extra: str):
    return collect(load_recipe(None, [*OVERRIDES, f"collect.out={out}", *extra]))


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root but the folder lock (it names the last collect's pid): (mtime_ns, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _assert_same_contents(a: Path, b: Path) -> None:
    with ActivationCache(a) as ca, ActivationCache(b) as cb:
        assert ca.manifest["summary"] == cb.manifest["summary"]
        for layer in ca.layers:
            ra, rb = ca.read(layer, include_dropped=True), cb.read(layer, include_dropped=True)
            pairs = list(zip(ra["sequence"].tolist(), ra["position"].tolist(), strict=True))
            assert len(set(pairs)) == len(pairs)  # no token twice
            for key in ra:
                assert np.array_equal(ra[key], rb[key]), (layer, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    _collect(out)
    return out


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "collect", "recipes/demo.yaml", "model.num_layers=null",
                             "model.d_model=null", "model.dtype=auto", *OVERRIDES, f"collect.out={out}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shards" / "shard_000000.h5"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, "collection ended before its first shard was seen"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    manifest = json.loads((out / "manifest.json").read_text())
    finished = sorted(p.name for p in (out / "shards").glob("*.h5"))
    assert not manifest["complete"] and 1 <= len(finished) < 24  # killed mid-way
    before = _snapshot(out / "shards")

    with pytest.raises(WorkbenchError, match="incomplete"):
        ActivationCache(out)
    summary = collect(load_recipe(REPO / "recipes/demo.yaml", ["model.num_layers=null", "model.d_model=null",
                                                               "model.dtype=auto", *OVERRIDES, f"collect.out={out}"]))
    after = _snapshot(out / "shards")
    assert {name: after[name] for name in finished} == {name: before[name] for name in finished}  # not redone
    assert not list((out / "shards").glob("*.partial"))
    assert summary.tokens_this_run == summary.tokens - 128 * len(finished)
    _assert_same_contents(out, reference)


def test_a_partial_shard_is_never_taken_for_complete(tmp_path, reference):
    """A crash after a shard was marked complete inside its file but before the rename to its final name."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("shards", "summary")} | {"complete": False}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shard = out / "shards" / "shard_000005.h5"
    partial = shard.with_name(shard.name + ".partial")
    shard.rename(partial)
    with h5py.File(partial, "r+") as h5:  # looks finished inside, but with a wrong first token
        assert h5.attrs["complete"]
        h5["layer_1/activations"][0] = 1e6
    untouched = _snapshot(out / "shards")
    del untouched[partial.name]

    summary = _collect(out)
    assert summary.tokens_this_run == 128  # only shard 5 was written again
    assert not partial.exists()
    assert {k: v for k, v in _snapshot(out / "shards").items() if k != shard.name} == untouched
    _assert_same_contents(out, reference)


def test_a_truncated_shard_is_reported_by_name_and_redone_by_a_rerun(tmp_path, reference):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    shard = out / "shards" / "shard_000003.h5"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    with ActivationCache(out) as cache, pytest.raises(WorkbenchError, match="shard_000003.h5 is truncated") as err:
        cache.read(1)
    assert "re-run the same `workbench collect`" in str(err.value)
    # A file truncated to its original length (zeros at the end) is caught by h5py, by name too.
    with open(shard, "r+b") as fh:
        fh.truncate(size)
    with ActivationCache(out) as cache, pytest.raises(WorkbenchError, match="shard_000003.h5"):
        cache.read(3)

    summary = _collect(out)
    assert summary.tokens_this_run == 128
    _assert_same_contents(out, reference)


def test_rerunning_a_complete_cache_changes_nothing(tmp_path, reference):
    out = tmp_path / "cache"
    shutil.copytree(reference, out, copy_function=shutil.copy2)
    before = _snapshot(out)
    summary = _collect(out)
    assert _snapshot(out) == before
    assert summary.seconds == 0 and summary.tokens == 24 * 128


def test_a_cache_made_by_another_recipe_is_an_error_and_is_left_alone(tmp_path, reference):
    out = tmp_path / "cache"
    shutil.copytree(reference, out, copy_function=shutil.copy2)
    before = _snapshot(out)
    with pytest.raises(WorkbenchError, match=r"different recipe \(differs in collect.sink_multiple\)"):
        _collect(out, "collect.sink_multiple=5")
    with pytest.raises(WorkbenchError, match="data.num_tokens"):
        _collect(out, "data.num_tokens=4096")
    assert _snapshot(out) == before
    # an unfinished cache of another recipe too
    manifest = json.loads((out / "manifest.json").read_text()) | {"complete": False}
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    with pytest.raises(WorkbenchError, match="different recipe"):
        _collect(out, "model.dtype=bfloat16")
    assert _snapshot(out) == before


def test_a_directory_that_is_not_a_cache_is_left_alone(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="exists and is not an activation cache"):
        _collect(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
