"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing already written lost."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.cache import ActivationCache
from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.embedded import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.context_length=64", "data.num_tokens=512", "collect.batch_size=4", "collect.layers=[1]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(stderr: str, command: str = "collect") -> str:
    """The one error line (progress bars and library logging aside), checked for form."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"workbench {command}: error: ")
    return lines[0]


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("model.name=/nonexistent/model", "model.name /nonexistent/model is not a directory"),
    ("data.path=/nonexistent/docs.txt", "data.path /nonexistent/docs.txt does not exist"),
    ("data.path=/nonexistent", "data.path /nonexistent is not a .txt/.jsonl file or a directory"),
    ("collect.layers=[9]", "collect.layers entry 9 is out of range: the model has layers 0..3"),
    ("collect.layers=[-5]", "collect.layers entry -5 is out of range"),
    ("data.context_length=2048", "data.context_length 2048 is beyond the model's 1024 positions"),
    ("collect.bach_size=3", "unknown recipe key 'collect.bach_size' (did you mean 'collect.batch_size'?)"),
    ("collect.sink_median=some", "collect.sink_median must be one of real, all"),
    ("collect.device=cuda:3", "CUDA is not available"),
])
def test_bad_recipe_values_give_one_line_and_write_nothing(tmp_path, capsys, override, message):
    if override.startswith("collect.device") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "cache"
    rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={out}", override)
    assert rc == 2
    assert message in _error_line(err)
    assert not out.exists()  # nothing is created before the recipe, model and data are known to be good


@pytest.mark.parametrize("content,packing,message", [
    ("", "true", "gave no complete row of 64 tokens"),
    ("\n  \n\n", "false", "gave no document with any tokens"),
    ("a short line\n", "true", "gave no complete row of 64 tokens"),
])
def test_an_empty_or_too_short_corpus_is_one_line(tmp_path, capsys, content, packing, message):
    docs = tmp_path / "docs.txt"
    docs.write_text(content)
    rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={tmp_path / 'c'}",
                       f"data.path={docs}", f"data.packing={packing}")
    assert rc == 2 and message in _error_line(err) and not (tmp_path / "c").exists()


def test_an_output_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={blocker / 'cache'}")
    line = _error_line(err)
    assert rc == 2 and f"cannot write {blocker / 'cache'}" in line and "Not a directory" in line
    rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={blocker}")
    assert rc == 2 and "is a file, not a directory" in _error_line(err)
    assert blocker.read_text() == "not a directory"


def test_a_directory_without_write_permission_is_one_line(tmp_path, capsys, monkeypatch):
    """What a read-only parent gives (simulated: root ignores permissions, so chmod cannot show it)."""
    out = tmp_path / "locked" / "cache"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={out}")
    line = _error_line(err)
    assert rc == 2 and f"cannot write {out}: Permission denied; check that the directory is writable" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_one_line(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        rc, err = _run_cli(capsys, "collect", str(REPO / "recipes/demo.yaml"), *SMALL, f"collect.out={parent / 'cache'}")
    finally:
        parent.chmod(0o700)
    assert rc == 2 and "Permission denied" in _error_line(err)


def _ragged_docs(path: Path) -> None:
    """16 short documents, then long ones: shard 0 is small, later shards are large."""
    words = (REPO / "workbench/assets/corpus.txt").read_text().split()
    lines = [" ".join(words[i * 5:(i + 1) * 5]) for i in range(16)]
    lines += [" ".join(words[1000 + i * 400:1000 + (i + 1) * 400]) for i in range(48)]
    path.write_text("\n".join(lines) + "\n")


def test_a_full_disk_is_one_line_keeps_finished_shards_and_a_rerun_finishes(tmp_path):
    """`ulimit -f` makes a write past the limit fail with EFBIG, as a full disk fails with ENOSPC."""
    resolve_model_path("embedded:tiny-qwen3")  # built outside the limit
    docs = tmp_path / "docs.txt"
    _ragged_docs(docs)
    args = ["data.context_length=256", "data.num_tokens=16384", "data.packing=false", f"data.path={docs}",
            "collect.batch_size=8", "collect.shard_batches=2", "collect.layers=[1]"]
    out = tmp_path / "cache"
    workbench = f"{sys.executable} -m workbench collect recipes/demo.yaml {' '.join(args)} collect.out={out}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", f"ulimit -f 600; {workbench}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert "shard_000001.h5.partial" in line and "File too large" in line and "ulimit -f" in line
    shard0 = out / "shards" / "shard_000000.h5"
    assert [p.name for p in (out / "shards").iterdir()] == ["shard_000000.h5"]  # the partial one is removed
    digest = hashlib.sha256(shard0.read_bytes()).hexdigest()

    proc = subprocess.run(["bash", "-c", workbench], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hashlib.sha256(shard0.read_bytes()).hexdigest() == digest  # kept, not redone
    collect(load_recipe(REPO / "recipes/demo.yaml", [*args, f"collect.out={tmp_path / 'reference'}"]))
    with ActivationCache(out) as a, ActivationCache(tmp_path / "reference") as b:
        assert a.manifest["summary"] == b.manifest["summary"] and len(a.shards) == 4
        ra, rb = a.read(1, include_dropped=True), b.read(1, include_dropped=True)
        assert all(np.array_equal(ra[k], rb[k]) for k in ra)


def test_a_truncated_shard_is_one_line_from_inspect(tmp_path, capsys):
    out = tmp_path / "cache"
    collect(load_recipe(REPO / "recipes/demo.yaml", [*SMALL, "collect.shard_batches=1", f"collect.out={out}"]))
    shard = out / "shards" / "shard_000001.h5"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    rc, err = _run_cli(capsys, "inspect", str(out))
    line = _error_line(err, "inspect")
    assert rc == 2 and str(shard) in line and "truncated" in line


def test_inspect_of_a_missing_or_unfinished_cache_is_one_line(tmp_path, capsys):
    rc, err = _run_cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert rc == 2 and "no activation cache" in _error_line(err, "inspect")
