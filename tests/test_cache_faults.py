"""A damaged cache is caught before anything uses it: NaN or random bytes in a shard (size unchanged),
a shard that is not HDF5, a hand-edited manifest, a folder that is not a cache, a cache written before
checksums. Each is one line naming the file (and the rows) and the fix, exit 2, nothing written; a
`workbench collect` re-run redoes exactly the damaged shard."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from workbench.cache import ActivationCache, verify_shard
from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
# 128 rows of 64 tokens in 8 forward batches of 16, two batches a shard: 4 shards of 2,048 tokens.
COLLECT = ["data.num_tokens=8192", "data.context_length=64", f"collect.layers=[{LAYER}]", "collect.shard_batches=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(stderr: str, command: str) -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"workbench {command}: error: ")
    return lines[0]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of one CLI command, in this process."""
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "cache"
    collect(load_recipe(REPO / "recipes/demo.yaml", [*COLLECT, f"collect.out={out}"]))
    return out


@pytest.fixture
def cache(tmp_path, reference) -> Path:
    """A copy of the reference cache, to damage."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def _recipe(tmp_path: Path, cache: Path) -> Path:
    """The demo recipe collecting `cache` and training one small SAE on it (60 steps)."""
    path = tmp_path / "recipe.yaml"
    section = {"layers": [LAYER], "saes": [{"name": "btk", "arch": "batchtopk", "width": 128, "k": 8}],
               "batch_size": 256, "num_tokens": 256 * 60, "warmup_steps": 10, "threshold_start_step": 10,
               "eval_tokens": 1024, "checkpoint_every": 1000, "out": str(tmp_path / "saes")}
    overrides = dict(item.split("=", 1) for item in COLLECT)
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes/demo.yaml"), "train": section,
                                    "data": {"num_tokens": int(overrides["data.num_tokens"]),
                                             "context_length": int(overrides["data.context_length"])},
                                    "collect": {"layers": [LAYER], "shard_batches": 2, "out": str(cache)}}))
    return path


def _train(recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", "train", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _digests(root: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((root / "shards").iterdir())}


def _chunk_offset(shard: Path, dataset: str, chunk: int) -> int:
    with h5py.File(shard, "r") as h5:
        return int(h5[dataset].id.get_chunk_info(chunk).byte_offset)


def _same_contents(a: Path, b: Path) -> None:
    with ActivationCache(a) as ca, ActivationCache(b) as cb:
        ra, rb = ca.read(LAYER, include_dropped=True), cb.read(LAYER, include_dropped=True)
        assert all(np.array_equal(ra[k], rb[k]) for k in ra)


# ---- non-finite and corrupt data --------------------------------------------------------------------

def test_a_nan_written_into_a_kept_row_stops_training_naming_the_shard_and_row(tmp_path, cache):
    shard = cache / "shards" / "shard_000001.h5"
    size = shard.stat().st_size
    with h5py.File(shard, "r+") as h5:
        row = int(np.flatnonzero(h5[f"layer_{LAYER}/kept"][:])[300])
        h5[f"layer_{LAYER}/activations"][row, 5] = np.nan
        seq, pos = int(h5["tokens/sequence"][row]), int(h5["tokens/position"][row])
    assert shard.stat().st_size == size  # the cache still looks complete

    proc = _train(_recipe(tmp_path, cache))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _error_line(proc.stderr, "train")
    assert f"cache shard {shard} is corrupt" in line
    assert f"row {row} (sequence {seq}, position {pos}) holds NaN or Inf" in line
    assert "delete it and re-run the same `workbench collect` command" in line
    assert not list((tmp_path / "saes").rglob("ae.pt")) and not list((tmp_path / "saes").rglob("checkpoint.pt"))

    with ActivationCache(cache) as reader, pytest.raises(WorkbenchError, match=f"row {row} "):
        reader.read(LAYER)


def test_random_bytes_in_a_shard_are_reported_by_inspect_and_train_and_a_collect_rerun_redoes_that_shard(
        tmp_path, cache, reference, capsys):
    shard = cache / "shards" / "shard_000002.h5"
    size = shard.stat().st_size
    offset = _chunk_offset(shard, f"layer_{LAYER}/activations", 1) + 1000
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).bytes(4096))
    assert shard.stat().st_size == size
    others = {k: v for k, v in _digests(cache).items() if k != shard.name}

    rc, _, err = _cli(capsys, "inspect", str(cache), "--verify")
    line = _error_line(err, "inspect")
    assert rc == 2 and "1 of 4 shards are corrupt: shard_000002.h5 (layer_2/activations rows 256..511 do not match" in line
    assert "re-run the same `workbench collect` command to redo them" in line
    rc, out, _ = _cli(capsys, "inspect", str(cache))  # without --verify only the metadata is read, and it is intact
    assert rc == 0 and "xxh3 of every block, checked by every read" in out

    recipe = _recipe(tmp_path, cache)
    proc = _train(recipe)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _error_line(proc.stderr, "train")
    assert f"cache shard {shard} is corrupt: layer_2/activations rows 256..511 do not match their checksum" in line
    assert not list((tmp_path / "saes").rglob("ae.pt"))

    summary = collect(load_recipe(recipe))
    assert "redoing 1 missing or damaged shard(s): shard_000002.h5 (layer_2/activations rows 256..511" in capsys.readouterr().err
    with ActivationCache(cache) as reader:
        assert summary.tokens_this_run == reader.manifest["shards"][2]["num_tokens"]
    assert {k: v for k, v in _digests(cache).items() if k != shard.name} == others  # only that shard redone
    _same_contents(cache, reference)
    rc, out, _ = _cli(capsys, "inspect", str(cache), "--verify")
    assert rc == 0 and "all 4 shards verified" in out

    proc = _train(recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "saes" / f"resid_post_layer_{LAYER}" / "btk" / "ae.pt").is_file()


def test_random_bytes_in_per_token_metadata_are_caught_by_plain_inspect(cache, capsys):
    shard = cache / "shards" / "shard_000003.h5"
    offset = _chunk_offset(shard, f"layer_{LAYER}/norm", 0) + 64
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(1).bytes(256))
    rc, _, err = _cli(capsys, "inspect", str(cache))
    line = _error_line(err, "inspect")
    assert rc == 2 and f"cache shard {shard} is corrupt: layer_2/norm rows 0..2047 do not match their checksum" in line
    assert verify_shard(shard, None, {}).damaged == "layer_2/norm rows 0..2047 do not match their checksum"


def test_a_shard_that_is_not_hdf5_is_named_and_redone_by_a_rerun(tmp_path, cache, reference, capsys):
    shard = cache / "shards" / "shard_000000.h5"
    shard.write_bytes(b"not an HDF5 file\n" * (shard.stat().st_size // 17) + b"x" * (shard.stat().st_size % 17))
    rc, _, err = _cli(capsys, "inspect", str(cache))
    line = _error_line(err, "inspect")
    assert rc == 2 and f"cannot read cache shard {shard}" in line and "delete it and re-run" in line
    collect(load_recipe(_recipe(tmp_path, cache)))
    assert "shard_000000.h5 (it is not a readable HDF5 shard" in capsys.readouterr().err
    _same_contents(cache, reference)


def _as_format_1(cache: Path) -> None:
    """What a cache written before checksums looks like: no xxh3 group, version 1 everywhere."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with h5py.File(cache / entry["file"], "r+") as h5:
            del h5["xxh3"]
            h5.attrs["version"] = 1
        entry["bytes"] = (cache / entry["file"]).stat().st_size
    manifest["version"] = 1
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_a_cache_written_before_checksums_loads_and_says_it_cannot_be_verified(cache, reference, capsys):
    _as_format_1(cache)
    _same_contents(cache, reference)
    with ActivationCache(cache) as old, ActivationCache(reference) as new:
        a = np.concatenate([b.numpy() for b in old.batches(LAYER, 500, seed=3, drop_last=False)])
        b = np.concatenate([b.numpy() for b in new.batches(LAYER, 500, seed=3, drop_last=False)])
        assert np.array_equal(a, b)
    rc, out, _ = _cli(capsys, "inspect", str(cache))
    assert rc == 0 and "checksums  none (cache format version 1)" in out
    rc, out, _ = _cli(capsys, "inspect", str(cache), "--verify")
    assert rc == 0 and "0 of 4 shards verified; 4 have no checksums" in out


def test_a_nan_in_a_cache_without_checksums_is_caught_by_the_reader(cache):
    _as_format_1(cache)
    shard = cache / "shards" / "shard_000002.h5"
    with h5py.File(shard, "r+") as h5:
        row = int(np.flatnonzero(h5[f"layer_{LAYER}/kept"][:])[10])
        h5[f"layer_{LAYER}/activations"][row, 0] = np.inf
    with ActivationCache(cache) as reader:
        with pytest.raises(WorkbenchError, match=re.escape(f"{shard} holds non-finite activations (NaN or Inf) in "
                                                           f"layer_2/activations at row {row} (sequence")):
            list(reader.batches(LAYER, 256))
        with pytest.raises(WorkbenchError, match=f"at row {row} "):
            reader.read(LAYER)


# ---- manifests --------------------------------------------------------------------------------------

def _edit_manifest(cache: Path, edit) -> None:
    path = cache / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("edit,message", [
    (lambda m: [m], "holds a JSON list, not an object"),
    (lambda m: {**m, "layers": [2, 3]}, "summary.layers has no counts for layer 3, which layers lists"),
    (lambda m: {**m, "d_model": "64"}, 'd_model is "64", not a positive integer'),
    (lambda m: {**m, "shards": m["shards"][:1] + [{**m["shards"][1], "file": "../../etc/passwd"}] + m["shards"][2:]},
     "shards[1] is not the entry of shards/shard_000001.h5"),
    (lambda m: {**m, "summary": {**m["summary"], "layers": {}}}, "summary.layers has no counts for layer 2"),
    (lambda m: {k: v for k, v in m.items() if k != "recipe"}, "recipe.model.name is missing or wrong"),
])
def test_a_hand_edited_manifest_is_one_line_naming_it(tmp_path, cache, capsys, edit, message):
    _edit_manifest(cache, edit)
    before = _digests(cache)
    for command, args in (("inspect", [str(cache)]), ("collect", [str(_recipe(tmp_path, cache))]),
                          ("train", [str(_recipe(tmp_path, cache))])):
        rc, _, err = _cli(capsys, command, *args)
        line = _error_line(err, command)
        assert rc == 2 and str(cache / "manifest.json") in line and message in line, line
        assert f"restore it, or delete {cache} and run `workbench collect` again" in line
    assert _digests(cache) == before


@pytest.mark.parametrize("edit,what", [
    (lambda m: {**m, "d_model": 32}, "d_model 32 in the manifest, 64 in the shard"),
    (lambda m: {**m, "store_dtype": "bfloat16"}, "store_dtype bfloat16 in the manifest, float32 in the shard"),
    (lambda m: {**m, "layers": [1], "summary": {**m["summary"], "layers": {"1": m["summary"]["layers"]["2"]}}},
     "layers [1] in the manifest, [2] in the shard"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "num_tokens": 100}, *m["shards"][1:]]},
     "num_tokens 100 in the manifest, 2048 in the shard"),
])
def test_a_manifest_that_disagrees_with_whole_shards_is_blamed_not_the_shards(tmp_path, cache, capsys, edit, what):
    """Advising to delete shard 0 (as before) would break the cache; the manifest is what changed."""
    _edit_manifest(cache, edit)
    before = _digests(cache)
    shard0 = cache / "shards" / "shard_000000.h5"
    with pytest.raises(WorkbenchError) as err:
        with ActivationCache(cache) as reader:
            reader.read(reader.layers[0])
    assert str(err.value) == (f"{cache / 'manifest.json'} does not match {shard0} ({what}): the manifest was edited "
                              f"or comes from another cache; restore it, or delete {cache} and run `workbench collect` again")
    for command, args in (("inspect", [str(cache), "--verify"]), ("collect", [str(_recipe(tmp_path, cache))])):
        rc, _, err_text = _cli(capsys, command, *args)
        line = _error_line(err_text, command)
        assert rc == 2 and f"does not match {shard0} ({what})" in line and "delete it" not in line
    assert _digests(cache) == before  # nothing deleted or redone


# ---- not a cache ------------------------------------------------------------------------------------

def test_inspect_of_a_folder_or_file_that_is_not_a_cache_is_one_line(tmp_path, reference, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "someone else's manifest"}))
    for path, message in ((empty, f"no activation cache at {empty} (no manifest.json); run `workbench collect` first"),
                          (other, f"{other / 'manifest.json'} is not an activation-cache manifest"),
                          (reference / "shards" / "shard_000000.h5", "is a file, not an activation cache; give the "
                                                                     "cache directory")):
        rc, _, err = _cli(capsys, "inspect", str(path))
        assert rc == 2 and message in _error_line(err, "inspect")
    assert list(empty.iterdir()) == [] and [p.name for p in other.iterdir()] == ["manifest.json"]


def test_train_cache_pointing_at_an_empty_folder_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = _recipe(tmp_path, tmp_path / "unused")
    rc, _, err = _cli(capsys, "train", str(recipe), f"train.cache={empty}")
    assert rc == 2 and f"no activation cache at {empty} (no manifest.json)" in _error_line(err, "train")
    assert not (tmp_path / "saes").exists() or not list((tmp_path / "saes").rglob("*.pt"))
