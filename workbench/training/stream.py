"""Training's read of a bounded cache (cache/buffer.py): shards in index order, as collection writes them,
shuffled within windows of train.shuffle_shards shards, every trained layer in step.

Window j of a layer is shards [H + j W, H + (j + 1) W) (H held-out shards, W = train.shuffle_shards): its kept
rows, after the rows the previous window left over (fewer than a batch), permuted by the layer's generator
(numpy PCG64 seeded with train.seed). Global batch i of the window is rows perm[i B, (i + 1) B); process r takes
the rows of its data lanes (lane l: rows l B / lanes ...), so the global batches, and the trained SAEs, do not
depend on the number of processes or on how far collection is ahead. Every process reads the whole window.

A layer's read position is (window, batch, the generator's state before the window's permutation, the rows
carried into it): a resume re-reads one window, whatever the step. The position after a window's last batch is
the start of the next one, so a checkpoint there needs none of the window's shards.

The stream also says when to checkpoint early: before a layer needs a window that the buffer has no room for
until training releases shards, it yields CHECKPOINT, and the loop writes a checkpoint at once (which releases
the shards below the windows the layers are in). Checkpoints change nothing in the result, so this is free to
happen wherever the data puts it; and it happens at the same step on every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from workbench.cache import buffer
from workbench.cache.layout import (
    CHECKSUMS,
    Manifest,
    block_checksums,
    from_stored,
    shard_is_complete,
    shard_name,
    shard_problems,
)
from workbench.cache.reader import _rng_from_state, _rng_to_state
from workbench.errors import WorkbenchError

CHECKPOINT = "checkpoint"  # the marker item: write a checkpoint now, before the next step


@dataclass
class StreamSpec:
    """What a bounded cache's training stream reads: the recipe's values, the same on every process."""

    root: Path
    batch_size: int  # the global batch
    lanes: list[int]  # this process's data lanes
    data_lanes: int
    seed: int
    window_shards: int  # W, train.shuffle_shards
    holdout: int  # H, collect.holdout_shards
    max_shards: int  # collect.max_shards_on_disk
    checkpoint_every: int
    steps: int


class _Cursor:
    """One layer's read: its window, the batch in it, the generator, the rows carried into the window."""

    def __init__(self, spec: StreamSpec, layer: int, source: _Shards, position: dict | None):
        self.spec, self.layer, self.source = spec, layer, source
        self.rng = np.random.default_rng(spec.seed)
        self.window, self.batch = 0, 0
        self.carry = None  # stored rows; None: none yet (the dtype comes with the first shard)
        if position is not None:
            self.window, self.batch = int(position["window"]), int(position["batch"])
            self.rng.bit_generator.state = _rng_from_state(position["rng"])
            self.carry = position["carry"].numpy()
        self.rows = None  # the loaded window, as stored, and its permutation
        self.perm = None
        self.rng_before = None
        self.carry_in = None  # the rows the loaded window started with

    def shards(self, window: int) -> range:
        w, h = self.spec.window_shards, self.spec.holdout
        return range(h + window * w, h + (window + 1) * w)

    def position(self) -> dict:
        """Where the next batch comes from, as a checkpoint records it (tensors, numbers and strings)."""
        if not self.needs_window:
            return {"window": self.window, "batch": self.batch, "rng": _rng_to_state(self.rng_before),
                    "carry": torch.from_numpy(self.carry_in.copy())}
        return {"window": self.next_window(), "batch": 0 if self.rows is not None else self.batch,
                "rng": _rng_to_state(self.rng.bit_generator.state),
                "carry": torch.from_numpy(self._rest() if self.rows is not None else self._carry_copy())}

    def _rest(self) -> np.ndarray:
        """The rows of the loaded window that no full batch took: the next window starts with them."""
        B = self.spec.batch_size
        return self.rows[self.perm[len(self.perm) // B * B:]]

    def _carry_copy(self) -> np.ndarray:
        return np.zeros((0, 0), np.uint8) if self.carry is None else self.carry.copy()

    @property
    def needs_window(self) -> bool:
        return self.rows is None or self.batch >= len(self.perm) // self.spec.batch_size

    def next_window(self) -> int:
        """The window the next batch comes from."""
        return self.window if self.rows is None else self.window + 1

    def load(self) -> None:
        """Read the next window (waiting for its shards) and permute it; the previous one's rest is carried.
        At the end of the data the window may hold less than a batch (needs_window stays true)."""
        if self.rows is not None:
            self.carry = self._rest()
            self.window += 1
            self.batch = 0
        parts = [] if self.carry is None or not len(self.carry) else [self.carry]
        for shard in self.shards(self.window):
            rows = self.source.kept_rows(shard, self.layer)
            if rows is None:
                break
            parts.append(rows)
        if not parts:
            self.rows, self.perm = None, None
            return
        self.carry_in = parts[0] if self.carry is not None and len(self.carry) else parts[0][:0]
        self.rows = np.concatenate(parts)
        self.rng_before = self.rng.bit_generator.state
        self.perm = self.rng.permutation(len(self.rows))

    def take(self, lanes: list[int] | None) -> torch.Tensor:
        """The next global batch's rows of `lanes` (None: all), as float32."""
        B, lane_rows = self.spec.batch_size, self.spec.batch_size // self.spec.data_lanes
        idx = self.perm[self.batch * B: (self.batch + 1) * B]
        if lanes is not None:
            idx = np.concatenate([idx[lane * lane_rows: (lane + 1) * lane_rows] for lane in lanes])
        self.batch += 1
        return torch.from_numpy(from_stored(self.rows[idx], self.source.store_dtype))


class _Shards:
    """The bounded cache's shards as training reads them: waiting for each to be written, checked as read."""

    def __init__(self, root: Path, show: bool):
        self.root = Path(root)
        manifest = Manifest.read(self.root)
        self.data = manifest.data
        self.store_dtype = self.data["store_dtype"]
        self.show = show

    def kept_rows(self, shard: int, layer: int) -> np.ndarray | None:
        """Layer `layer`'s kept rows of `shard`, as stored; None past the last shard of a complete cache."""
        path = self.root / shard_name(shard)
        waiting = buffer.Waiting("train", self.show)
        while not shard_is_complete(path):
            manifest = Manifest.read(self.root)
            if manifest.complete and shard >= len(manifest.data["shards"]):
                return None
            if manifest.complete and shard not in buffer.released(manifest.data):
                raise WorkbenchError(f"cache shard {path} is missing from the finished buffer; re-run the same `workbench "
                                     "collect` command to redo it, then this one")
            if shard in buffer.released(manifest.data):
                raise WorkbenchError(f"shard {path} was already consumed and deleted by this buffer's training, so the "
                                     "training cannot restart from before it: restore its checkpoint, or collect a new "
                                     "buffer (another collect.out)")
            waiting.tick(f"for shard {path} (layer {layer}): no collector has written it yet; is `workbench collect` "
                         "running on this recipe?")
        return self._read(path, layer)

    def _read(self, path: Path, layer: int) -> np.ndarray:
        try:
            with h5py.File(path, "r") as h5:
                n = int(h5.attrs["num_tokens"])
                expect = {"layers": list(self.data["layers"]), "d_model": self.data["d_model"],
                          "store_dtype": self.store_dtype, "num_tokens": n}
                damaged, mismatch = shard_problems(h5, expect)
                if damaged or mismatch:
                    raise WorkbenchError(f"cannot read cache shard {path}: {damaged or mismatch}; it is damaged or from "
                                         "another cache: collect the buffer again into a new collect.out")
                acts = self._checked(h5, f"layer_{layer}/activations", path)
                kept = self._checked(h5, f"layer_{layer}/kept", path)
        except OSError as err:
            raise WorkbenchError(f"cannot read cache shard {path} ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                                 "it is damaged: collect the buffer again into a new collect.out") from None
        return acts[kept]

    @staticmethod
    def _checked(h5: h5py.File, name: str, path: Path) -> np.ndarray:
        values = h5[name][:]
        sums = h5.get(f"{CHECKSUMS}/{name}")
        if sums is not None:
            rows = int(sums.attrs["rows"])
            got = np.asarray(block_checksums(values, rows), np.uint64)
            bad = np.flatnonzero(got != sums[:])
            if len(bad):
                first = int(bad[0]) * rows
                raise WorkbenchError(f"cache shard {path} is corrupt: {name} rows {first}..{min(first + rows, len(values)) - 1} "
                                     "do not match their checksum; collect the buffer again into a new collect.out")
        return values


def layer_batches(spec: StreamSpec, layer: int, show: bool = False) -> Iterator[torch.Tensor]:
    """One layer's full global batches from the start of its stream (the normalisation's sample). It reads
    only shards the buffer holds before any release: past them it would wait forever, so that is an error."""
    cursor = _Cursor(spec, layer, _Shards(spec.root, show), None)
    while True:
        if cursor.needs_window:
            if cursor.shards(cursor.next_window()).stop > spec.holdout + spec.max_shards:
                raise WorkbenchError(f"the normalisation's sample of layer {layer} reads past the first "
                                     f"collect.max_shards_on_disk={spec.max_shards} shards, which the buffer holds before "
                                     "training releases any: raise collect.max_shards_on_disk, or sample fewer batches")
            cursor.load()
            if cursor.needs_window:
                return
        yield cursor.take(None)


def _resume_windows(cursors: dict[int, _Cursor]) -> dict[int, int]:
    """The window each layer's checkpoint would resume in, were one written now."""
    return {layer: c.next_window() if c.needs_window else c.window for layer, c in cursors.items()}


def stream(spec: StreamSpec, layers: list[int], starts: dict[int, int], positions: dict[int, dict | None],
           show: bool = False) -> Iterator:
    """The training stream: for each step from min(starts), (step, {layer: (x_BD, position after it)}) for
    the layers whose checkpoint is before that step (a kill between two layers' checkpoints leaves them at
    different steps; the one behind catches up), with CHECKPOINT items where the loop must checkpoint first."""
    source = _Shards(spec.root, show)
    cursors = {layer: _Cursor(spec, layer, source, positions[layer]) for layer in layers}
    held = {layer: cursors[layer].next_window() for layer in layers}  # the window each checkpoint resumes in
    for step in range(min(starts.values()), spec.steps):
        active = [layer for layer in layers if step >= starts[layer]]
        for layer in active:
            cursor = cursors[layer]
            if not cursor.needs_window:
                continue
            need = cursor.shards(cursor.next_window()).stop
            if need > spec.holdout + spec.window_shards * min(held.values()) + spec.max_shards:
                now = _resume_windows(cursors)
                if need > spec.holdout + spec.window_shards * min(now.values()) + spec.max_shards:
                    behind = min(now, key=now.get)
                    raise WorkbenchError(
                        f"collect.max_shards_on_disk={spec.max_shards} is too small for these layers: layer {layer} needs "
                        f"shards up to {need - 1} while layer {behind} still reads from shard "
                        f"{cursors[behind].shards(now[behind]).start} (their kept tokens differ); raise it to "
                        f"{need - cursors[behind].shards(now[behind]).start} or more and run the same commands again")
                if now != held:
                    held = now
                    yield CHECKPOINT
            cursor.load()
            if cursor.needs_window:
                raise WorkbenchError(f"the buffer at {spec.root} ran out of training tokens for layer {layer} at step "
                                     f"{step} of {spec.steps}: lower train.num_tokens (one pass over the buffer is "
                                     "all there is) or collect more (data.num_tokens)")
        batch = {layer: cursors[layer].take(spec.lanes) for layer in active}
        yield step, {layer: (x_BD, cursors[layer].position()) for layer, x_BD in batch.items()}
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps:
            held = _resume_windows(cursors)
