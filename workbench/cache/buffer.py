"""The cache as a bounded buffer (`collect.max_shards_on_disk: N`): collection and training run at the same
time, and a shard is deleted once every layer's training has consumed it.

What is on disk, besides the layout of layout.py:

    manifest.json  "buffer": {"max_shards_on_disk", "holdout_shards"} and "released": {index: the shard's
                   manifest entry and stats}, every shard deleted so far (recorded before it is deleted)
    .manifest.lock held (flock, for a moment) by whoever rewrites manifest.json: the collector, a trainer
    consumers/layer_<L>.json  {"released_below", "fingerprint", "out"}: layer L's training no longer needs
                   shards below `released_below`
    consumers/layer_<L>.lock  held by the one `workbench train` that trains layer L from this buffer

The rules:
- Shards 0 .. holdout_shards - 1 are held out: never trained on, never deleted. eval_results.json, the
  threshold stage and everything that reads the cache after training read them (`ActivationCache` opens a
  bounded cache as its held-out shards).
- A collector process writes shard s only while s < floor + N, floor = the lowest `released_below` over the
  cache's layers (holdout_shards before any release): so at most N shards that training has not released are
  on disk, plus the one each collecting process is writing.
- Training reads shards in index order, window after window (training/stream.py), and raises its layer's
  `released_below` to the first shard of the window its checkpoint resumes from, right after that checkpoint
  is written. `release` then records and deletes every shard below the floor.
- Two trainers may share a buffer only for disjoint layers; a layer's shards are deleted once every layer of
  the cache has released them.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from workbench.cache.layout import SHARD_DIR, Manifest, shard_name
from workbench.errors import WorkbenchError
from workbench.files import file_lock, make_dir, read_json_object, write_error, write_json

CONSUMERS = "consumers"
MANIFEST_LOCK = ".manifest.lock"
POLL_SECONDS = 0.1  # how often a waiting side looks at the other's files
DONE = 2**62  # the released_below of a layer whose training is finished: it needs no shard any more


def stall_seconds() -> float:
    """How long a side waits before it says so (WORKBENCH_STALL_SECONDS; 60 s by default)."""
    return float(os.environ.get("WORKBENCH_STALL_SECONDS", "60"))


def consumer_path(root: Path, layer: int) -> Path:
    return Path(root) / CONSUMERS / f"layer_{layer}.json"


@contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """Exclusive, blocking, for a read-modify-write of manifest.json by the collector or a trainer."""
    path = Path(root) / MANIFEST_LOCK
    try:
        fh = open(path, "a+")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fh.close()


def is_bounded(manifest: dict) -> bool:
    return isinstance(manifest.get("buffer"), dict)


def holdout_shards(manifest: dict) -> int:
    return int(manifest["buffer"]["holdout_shards"]) if is_bounded(manifest) else 0


def released(manifest: dict) -> dict[int, dict]:
    """The shards a bounded cache has deleted: index -> its manifest entry (file, num_tokens, ...) and stats."""
    return {int(k): v for k, v in (manifest.get("released") or {}).items()}


def released_below(root: Path, layer: int) -> int | None:
    """How far layer `layer` has released the buffer (None: no training has released anything)."""
    data = read_json_object(consumer_path(root, layer), fix="delete it only together with the cache")
    return None if data is None else int(data["released_below"])


def floor(root: Path, layers: list[int], holdout: int) -> int:
    """The first shard some layer still needs: shards below it are released by every layer."""
    return min(max(holdout, released_below(root, layer) or 0) for layer in layers)


@contextmanager
def claim_layer(root: Path, layer: int, fingerprint: str, out: str) -> Iterator[None]:
    """Hold layer `layer` of the buffer for one trainer: a second trainer of the same layer fails at once, and so
    does a trainer whose recipe differs from the one that already released (and deleted) part of the layer."""
    path = make_dir(Path(root) / CONSUMERS) / f"layer_{layer}.lock"

    def busy(holder: str) -> str:
        return (f"layer {layer} of the buffer at {root} is already being trained by {holder}: two trainers cannot "
                "share a layer; train other layers (train.layers) or wait for it")

    with file_lock(path, f"workbench train into {out}", busy):
        found = read_json_object(consumer_path(root, layer), fix="delete it only together with the cache")
        if found is not None and found.get("fingerprint") != fingerprint:
            below = int(found.get("released_below", 0))
            upto = "to its end" if below >= DONE else f"up to shard {below}"
            raise WorkbenchError(f"layer {layer} of the buffer at {root} was consumed {upto} by another training (into "
                                 f"{found.get('out')}), and those shards are deleted: restore that recipe to resume it, or "
                                 "collect a new buffer (another collect.out)")
        yield


def write_release(root: Path, layer: int, below: int, fingerprint: str, out: str) -> None:
    """Layer `layer` no longer needs shards below `below` (called after the checkpoint that says so is on disk)."""
    write_json(consumer_path(root, layer), {"released_below": below, "fingerprint": fingerprint, "out": out},
               resume="re-run the same command to resume")


def written(root: Path) -> list[int]:
    """The indices of the shards under their final names (complete or being checked), in order."""
    folder = Path(root) / SHARD_DIR
    names = [p.name for p in folder.glob("shard_*.h5")] if folder.is_dir() else []
    return sorted(int(n[len("shard_"):-len(".h5")]) for n in names if n[len("shard_"):-len(".h5")].isdigit())


def release(root: Path) -> int:
    """Record in the manifest, then delete, every shard that every layer has released and that is not held
    out. Idempotent (a kill between recording and deleting leaves a recorded shard that the next call deletes).
    Returns the floor."""
    root = Path(root)
    with manifest_lock(root):
        manifest = Manifest.read(root)
        if manifest is None or not is_bounded(manifest.data):
            return 0
        data = manifest.data
        holdout = holdout_shards(data)
        below = floor(root, list(data["layers"]), holdout)
        done = released(data)
        new = {}
        for index in written(root):
            path = root / shard_name(index)
            if not holdout <= index < below or index in done:
                continue
            try:
                with h5py.File(path, "r") as h5:
                    a = h5.attrs
                    new[index] = {"file": shard_name(index), "num_tokens": int(a["num_tokens"]),
                                  "num_batches": int(a["num_batches"]), "first_batch": int(a["first_batch"]),
                                  "bytes": path.stat().st_size, "stats": str(a["stats"])}
            except (OSError, KeyError) as err:
                raise WorkbenchError(f"cannot read shard {path} to release it ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                                     "the buffer is damaged: collect it again into a new collect.out") from None
        if new:
            data["released"] = {str(k): v for k, v in sorted((done | new).items())}
            manifest.write()
        for index in sorted(released(data)):
            (root / shard_name(index)).unlink(missing_ok=True)
    return below


STOP = threading.Event()  # set by a training that is ending (an error, Ctrl-C): its reader thread stops waiting


class Waiting:
    """A side that waits for the other says so: one line after stall_seconds() without progress, and again
    every stall_seconds() while it still waits. A wait in a reader thread ends when STOP is set."""

    def __init__(self, who: str, show: bool = True):
        self.who, self.show = who, show
        self.since: float | None = None
        self.said = 0.0

    def tick(self, what: str) -> None:
        if STOP.is_set() and threading.current_thread() is not threading.main_thread():
            raise WorkbenchError(f"{self.who}: stopped while waiting {what.split(':')[0]}")
        now = time.time()
        if self.since is None:
            self.since, self.said = now, now
        if self.show and now - self.said >= stall_seconds():
            print(f"{self.who}: waiting since {time.strftime('%H:%M:%S', time.localtime(self.since))} "
                  f"({now - self.since:,.0f} s) {what}", file=sys.stderr, flush=True)
            self.said = now
        time.sleep(POLL_SECONDS)

    def done(self) -> None:
        self.since = None


def wait_for_room(root: Path, shard: int, max_shards: int, layers: list[int], holdout: int, show: bool,
                  check: Callable[[], None]) -> None:
    """The collector's wait before it writes shard `shard`: until it is below floor + max_shards. check runs
    between looks (collection's interrupt check)."""
    waiting = Waiting("collect", show)
    while shard >= (below := floor(root, layers, holdout)) + max_shards:
        check()
        per_layer = ", ".join(f"layer {layer} below {released_below(root, layer) or holdout}" for layer in layers)
        waiting.tick(f"for training to release shards: the buffer holds collect.max_shards_on_disk={max_shards} "
                     f"unreleased shards from shard {below}, and shard {shard} is next ({per_layer}); is "
                     "`workbench train` running for every layer of the cache?")
