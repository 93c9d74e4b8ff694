"""The cache's reader: `ActivationCache` opens a finished cache (layout.py), checks every block it reads
against its checksum, re-applies the sink filter at read time (sink.keep_mask), and serves whole layers
or shuffled float32 batches; `_ChunkReader` reads an activation chunk with one pread; `prefetch` runs an
iterator ahead in a background thread."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import xxhash
from h5py import h5s

from workbench.cache import buffer
from workbench.cache.layout import (
    CHECKSUMS,
    MANIFEST,
    STORE_NUMPY,
    Manifest,
    ShardCheck,
    block_checksums,
    chunk_rows,
    from_stored,
    nonfinite_rows,
    shard_is_complete,
    shard_name,
    shard_problems,
    verify_shard,
)
from workbench.errors import WorkbenchError
from workbench.sink import FIRST_TOKEN, drop_reasons, is_sink, keep_mask


@dataclass(frozen=True)
class ReadPosition:
    """Where a pass of `ActivationCache.positioned_batches` stands: the next batch is batch `batch` of the
    window that starts at block `window` of the pass's block order. The window is rebuilt from `carry_BD`
    (the rows it started with, as stored: fewer than a batch) and its blocks, and shuffled again from `rng`
    (the generator's state before the window's permutation). blocks, per_window, batch_size identify the pass."""

    window: int
    batch: int
    rng: dict
    carry_BD: np.ndarray
    blocks: int
    per_window: int
    batch_size: int

    def to_state(self) -> dict:
        """As tensors, numbers and strings (a checkpoint is read with torch.load(weights_only=True))."""
        return {"window": self.window, "batch": self.batch, "rng": _rng_to_state(self.rng),
                "carry": torch.from_numpy(self.carry_BD), "blocks": self.blocks, "per_window": self.per_window,
                "batch_size": self.batch_size}

    @classmethod
    def from_state(cls, state: dict) -> ReadPosition:
        return cls(state["window"], state["batch"], _rng_from_state(state["rng"]), state["carry"].numpy(),
                   state["blocks"], state["per_window"], state["batch_size"])


def _rng_to_state(state: dict) -> dict:
    """numpy's PCG64 state holds 128-bit integers: kept as their decimal text."""
    return {"bit_generator": state["bit_generator"], "state": str(state["state"]["state"]),
            "inc": str(state["state"]["inc"]), "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def _rng_from_state(state: dict) -> dict:
    return {"bit_generator": state["bit_generator"], "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


class _ChunkReader:
    """Reads rows of one activation chunk of a shard into a buffer.

    The shuffled reader reads ~64 KiB chunks in random order, where HDF5's per-call cost (~15 us) is
    as large as the copy itself. Collection stores chunks plainly (no compression or filter), so when
    HDF5's own chunk index confirms that for every chunk, a chunk is read with one `pread` at the
    offset the index gives (1.6x faster); otherwise, and where `os.preadv` does not exist, through
    HDF5's low-level read. Both read straight into the caller's buffer.
    """

    def __init__(self, path: Path, ds: h5py.Dataset, rows: int):
        self.rows, self.d_model = rows, ds.shape[1]
        self.dsid = ds.id
        self.fd: int | None = None
        self.offsets = self._plain_chunk_offsets(ds) if hasattr(os, "preadv") else None
        if self.offsets is not None:
            self.fd = os.open(path, os.O_RDONLY)

    def _plain_chunk_offsets(self, ds: h5py.Dataset) -> np.ndarray | None:
        """Byte offset of every chunk, or None unless every chunk is stored unfiltered and whole."""
        n_chunks = -(-ds.shape[0] // self.rows)
        chunk_bytes = self.rows * self.d_model * ds.dtype.itemsize
        if ds.chunks != (self.rows, self.d_model) or ds.compression or ds.fletcher32 or ds.shuffle:
            return None
        offsets = np.full(n_chunks, -1, np.int64)

        def visit(info) -> None:
            if info.filter_mask == 0 and info.size == chunk_bytes and info.chunk_offset[1] == 0:
                offsets[info.chunk_offset[0] // self.rows] = info.byte_offset

        if not hasattr(self.dsid, "chunk_iter"):
            return None
        self.dsid.chunk_iter(visit)
        return offsets if (offsets >= 0).all() else None

    def read(self, start: int, out: np.ndarray) -> None:
        """Rows [start, start + len(out)) of the chunk that begins at row `start` into out (C-contiguous)."""
        if self.fd is not None:
            got = os.preadv(self.fd, [out], int(self.offsets[start // self.rows]))
            if got != out.nbytes:
                raise OSError(f"short read at row {start} ({got} of {out.nbytes} bytes)")
            return
        space = self.dsid.get_space()  # one per read: readers may share this object across threads
        space.select_hyperslab((start, 0), out.shape)
        self.dsid.read(h5s.create_simple(out.shape), space, out)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


@dataclass
class _Block:
    shard: int
    start: int
    stop: int


class ActivationCache:
    """Read a finished cache.

        cache = ActivationCache("checkpoints/demo/cache")
        cache.layers, cache.d_model, cache.num_tokens(layer)
        cache.read(layer)                       # small caches: everything as numpy arrays
        for acts_BD in cache.batches(layer, 4096, seed=0):   # shuffled float32 torch batches
            ...

    Every block read is checked against its checksum (or, in a shard of format version 1, for finite
    activations) before it is returned: a damaged shard is one WorkbenchError naming it and its rows.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if self.root.is_file():
            raise WorkbenchError(f"{self.root} is a file, not an activation cache; give the cache directory "
                                 f"(collect.out, the one with {MANIFEST})")
        found = Manifest.read(self.root)
        if found is None:
            raise WorkbenchError(f"no activation cache at {self.root} (no {MANIFEST}); run `workbench collect` first, "
                                 "or give the directory it wrote (collect.out)")
        if not found.is_cache:
            raise WorkbenchError(f"{found.path} is not an activation-cache manifest; give the directory "
                                 "`workbench collect` wrote (collect.out)")
        # A bounded cache (buffer.py) is read as its held-out shards, the ones it keeps: readable as soon as they
        # are written, while collection and training go on.
        self.bounded = buffer.is_bounded(found.data)
        if not found.complete and not self.bounded:
            raise WorkbenchError(f"the cache at {self.root} is incomplete; re-run the same `workbench collect` command to finish it")
        self._manifest = found
        self.manifest: dict = found.data  # manifest.json as read (see layout.py)
        manifest = found.data
        entries = self._held_out_entries() if self.bounded else manifest["shards"]
        self.layers: list[int] = list(manifest["layers"])
        self.d_model: int = int(manifest["d_model"])
        self.store_dtype: str = manifest["store_dtype"]
        self.drop_first_token: bool = bool(manifest["recipe"]["collect"]["drop_first_token"])
        self.sink_multiple: float | None = manifest["recipe"]["collect"]["sink_multiple"]
        self.shards = [self.root / s["file"] for s in entries]
        self._shard_tokens = [int(s["num_tokens"]) for s in entries]
        self._shard_bytes = [s.get("bytes") for s in entries]
        self._chunk_rows = chunk_rows(self.d_model, self.store_dtype)
        # first global block index of each shard (blocks are chunk-aligned row ranges), and the total
        self._first_block = np.concatenate([[0], np.cumsum([-(-n // self._chunk_rows) for n in self._shard_tokens])])
        self._files: dict[int, h5py.File] = {}
        self._datasets: dict[tuple[int, str], h5py.Dataset] = {}
        self._checksums: dict[tuple[int, str], tuple[np.ndarray, int] | None] = {}
        self._medians: dict[tuple[int, int], np.ndarray] = {}
        self._keep_bits: dict[tuple[int, int, float | None], tuple[np.ndarray, np.ndarray]] = {}
        self._readers: dict[tuple[int, int], _ChunkReader] = {}
        self._spare_windows: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.blocks_read = 0  # activation blocks read by the batch readers since the cache was opened

    def _held_out_entries(self) -> list[dict]:
        """A bounded cache's held-out shards as manifest entries, with their statistics (`_kept`)."""
        entries, self._kept = [], dict.fromkeys(self.manifest["layers"], 0)
        for index in range(buffer.holdout_shards(self.manifest)):
            path = self.root / shard_name(index)
            if not shard_is_complete(path):
                raise WorkbenchError(f"the held-out shard {path} of the bounded cache at {self.root} is not written yet; "
                                     "wait for `workbench collect` to write it (or run it)")
            with h5py.File(path, "r") as h5:
                a = h5.attrs
                entries.append({"file": shard_name(index), "num_tokens": int(a["num_tokens"]), "bytes": path.stat().st_size})
                for layer, counts in json.loads(a["stats"])["layers"].items():
                    self._kept[int(layer)] += counts["kept"]
        return entries

    def _expectations(self, shard: int) -> dict:
        if not self.bounded:
            return self._manifest.shard_expectations(shard)
        m = self.manifest
        return {"layers": list(m["layers"]), "d_model": m["d_model"], "store_dtype": m["store_dtype"],
                "num_tokens": self._shard_tokens[shard]}

    def _h5(self, shard: int) -> h5py.File:
        """An open shard, checked against the manifest (size, completeness, token count, datasets)."""
        if shard not in self._files:
            path = self.shards[shard]
            if not path.is_file():
                raise WorkbenchError(f"cache shard {path} is missing; re-run the same `workbench collect` command to redo it")
            size, expected = path.stat().st_size, self._shard_bytes[shard]
            if expected is not None and size != expected:
                raise WorkbenchError(f"cache shard {path} is truncated or damaged ({size:,} bytes, the manifest says "
                                     f"{expected:,}); re-run the same `workbench collect` command to redo it")
            with self._reading(shard):
                h5 = h5py.File(path, "r")
                try:
                    damaged, mismatch = shard_problems(h5, self._expectations(shard))
                except BaseException:
                    h5.close()
                    raise
            if damaged or mismatch:
                h5.close()
                raise self._damaged(shard, damaged) if damaged else self._manifest.mismatch(path, mismatch)
            self._files[shard] = h5
        return self._files[shard]

    def _dataset(self, shard: int, name: str) -> h5py.Dataset:
        """A dataset handle, kept open: looking one up costs more than reading a 64 KiB chunk."""
        key = (shard, name)
        if key not in self._datasets:
            h5 = self._h5(shard)
            with self._reading(shard):
                self._datasets[key] = h5[name]
        return self._datasets[key]

    def _damaged(self, shard: int, why: str) -> WorkbenchError:
        return WorkbenchError(f"cannot read cache shard {self.shards[shard]}: {why}; the file is truncated or corrupt: "
                              "delete it and re-run the same `workbench collect` command to redo it")

    @contextmanager
    def _reading(self, shard: int):
        """Turn the errors h5py raises on a damaged file into one clear error naming the shard."""
        try:
            yield
        except WorkbenchError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise self._damaged(shard, str(err).splitlines()[0] if str(err) else type(err).__name__) from None

    def _sums(self, shard: int, name: str) -> tuple[np.ndarray, int] | None:
        """A dataset's stored checksums and rows a block; None for a shard written before checksums."""
        key = (shard, name)
        if key not in self._checksums:
            h5 = self._h5(shard)  # checked: a version 2 shard has every checksum, of the right length
            with self._reading(shard):
                sums = h5.get(f"{CHECKSUMS}/{name}") if int(h5.attrs.get("version", 1)) >= 2 else None
                self._checksums[key] = None if sums is None else (sums[:], int(sums.attrs["rows"]))
        return self._checksums[key]

    def _corrupt(self, shard: int, name: str, start: int, block: np.ndarray, checksum: bool) -> WorkbenchError:
        """Rows [start, start + len(block)) of a dataset failed their checksum (checksum=True) or hold
        non-finite activations in a shard without checksums (False)."""
        path = self.shards[shard]
        bad = nonfinite_rows(block, self.store_dtype) if name.endswith("/activations") else np.zeros(0, int)
        where = f"row {start + int(bad[0])}" if len(bad) else ""
        if len(bad):
            try:  # the token it is, for the message only
                seq = int(self._dataset(shard, "tokens/sequence")[start + int(bad[0])])
                pos = int(self._dataset(shard, "tokens/position")[start + int(bad[0])])
                where += f" (sequence {seq}, position {pos})"
            except (WorkbenchError, OSError, ValueError, IndexError):
                pass
            if len(bad) > 1:
                where += f" and {len(bad) - 1} more"
        if checksum:
            what = f"{name} rows {start}..{start + len(block) - 1} do not match their checksum"
            what += f"; {where} holds NaN or Inf" if where else ""
            return WorkbenchError(f"cache shard {path} is corrupt: {what}; delete it and re-run the same "
                                  "`workbench collect` command to redo it")
        return WorkbenchError(f"cache shard {path} holds non-finite activations (NaN or Inf) in {name} at {where}: it was "
                              "changed after collection or collected before such values were refused; delete it "
                              "and re-run the same `workbench collect` command to redo it")

    def _verify(self, shard: int, name: str, values: np.ndarray) -> None:
        """Check a whole dataset read from a shard: every block against its checksum, or (no checksums)
        the activations for NaN and Inf."""
        found = self._sums(shard, name)
        if found is None:
            if name.endswith("/activations") and len(nonfinite_rows(values, self.store_dtype)):
                raise self._corrupt(shard, name, 0, values, checksum=False)
            return
        sums, rows = found
        for i, got in enumerate(block_checksums(values, rows)):
            if got != sums[i]:
                raise self._corrupt(shard, name, i * rows, values[i * rows: (i + 1) * rows], checksum=True)

    def read_vector(self, shard: int, name: str) -> np.ndarray:
        """A whole dataset of a shard (e.g. "tokens/position", "layer_3/norm"), checked (see _verify)."""
        ds = self._dataset(shard, name)
        with self._reading(shard):
            values = ds[:]
        self._verify(shard, name, values)
        return values

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise WorkbenchError(f"layer {layer} is not in the cache at {self.root} (it has layers {self.layers})")

    def num_tokens(self, layer: int, sink_multiple: float | None = None) -> int:
        """Kept tokens of a layer: as collected, or (reading every shard's metadata) with another multiple."""
        self._check_layer(layer)
        if sink_multiple is None:
            return self._kept[layer] if self.bounded else int(self.manifest["summary"]["layers"][str(layer)]["kept"])
        return sum(int(self._keep(layer, shard, sink_multiple).sum()) for shard in range(len(self.shards)))

    def first_batch(self, shard: int) -> int:
        """The global index of a shard's first forward batch (tokens/batch minus it indexes batch_median)."""
        return int(self._h5(shard).attrs["first_batch"])

    def check_shard(self, shard: int) -> ShardCheck:
        """Read a whole shard and check it against its checksums (layout.verify_shard). A shard that is
        whole but disagrees with the manifest is a WorkbenchError naming manifest.json."""
        check = verify_shard(self.shards[shard], self._shard_bytes[shard], self._expectations(shard))
        if check.mismatch:
            raise self._manifest.mismatch(self.shards[shard], check.mismatch)
        return check

    def _batch_medians(self, layer: int, shard: int) -> np.ndarray:
        key = (layer, shard)
        if key not in self._medians:
            self._medians[key] = self.read_vector(shard, f"layer_{layer}/batch_median")
        return self._medians[key]

    def _keep(self, layer: int, shard: int, sink_multiple: float | None) -> np.ndarray:
        """Kept flags of a shard's rows: as collected, or re-filtered with another multiple (the same sink
        rule as collection, on the stored norms and batch medians)."""
        g = f"layer_{layer}"
        if sink_multiple is None:
            return self.read_vector(shard, f"{g}/kept")
        batch = self.read_vector(shard, "tokens/batch") - self.first_batch(shard)
        norms = self.read_vector(shard, f"{g}/norm")
        first = self.read_vector(shard, f"{g}/drop_reason") == FIRST_TOKEN
        medians = self._batch_medians(layer, shard)[batch]
        sink = is_sink(torch.from_numpy(norms), torch.from_numpy(medians), sink_multiple)
        # every stored token is real (padding is never stored): no valid mask
        return keep_mask(None, sink, torch.from_numpy(first) if self.drop_first_token else None).numpy()

    def _keep_blocks(self, layer: int, shard: int, sink_multiple: float | None) -> tuple[np.ndarray, np.ndarray]:
        """A shard's kept flags as bits (N/8 bytes, read once) and the kept rows of each block."""
        key = (layer, shard, sink_multiple)
        if key not in self._keep_bits:
            keep = self._keep(layer, shard, sink_multiple)
            pad = -len(keep) % self._chunk_rows
            kept = np.concatenate([keep, np.zeros(pad, bool)]).reshape(-1, self._chunk_rows).sum(axis=1)
            self._keep_bits[key] = (np.packbits(keep), kept)
        return self._keep_bits[key]

    def _keep_rows(self, layer: int, shard: int, start: int, stop: int, sink_multiple: float | None) -> np.ndarray:
        """Kept flags for rows [start, stop) of a shard."""
        bits = self._keep_blocks(layer, shard, sink_multiple)[0]
        lo = start // 8
        return np.unpackbits(bits[lo: -(-stop // 8)])[start - 8 * lo: stop - 8 * lo].view(bool)

    def read(self, layer: int, include_dropped: bool = False, sink_multiple: float | None = None) -> dict[str, np.ndarray]:
        """Every token of a layer as numpy arrays (loads the whole layer: for small caches).

        Returns activations [N, D] float32, token_ids, sequence, position; with include_dropped also
        kept [N] and drop_reason [N] (0 kept, 1 first token, 2 sink) for every stored token.
        sink_multiple re-applies the filter with another multiple (None: as collected).
        """
        self._check_layer(layer)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("activations", "token_ids", "sequence", "position", "kept", "drop_reason")}
        for shard in range(len(self.shards)):
            keep = self._keep(layer, shard, sink_multiple)
            rows = slice(None) if include_dropped else keep
            reason = self.read_vector(shard, f"layer_{layer}/drop_reason")
            stored = self.read_vector(shard, f"layer_{layer}/activations")
            parts["activations"].append(from_stored(stored[rows], self.store_dtype))
            for key, name in (("token_ids", "token_id"), ("sequence", "sequence"), ("position", "position")):
                parts[key].append(self.read_vector(shard, f"tokens/{name}")[rows])
            if sink_multiple is not None:
                reason = drop_reasons(torch.from_numpy(keep), torch.from_numpy(reason == FIRST_TOKEN)).numpy()
            parts["kept"].append(keep[rows])
            parts["drop_reason"].append(reason[rows])
        out = {k: np.concatenate(v) for k, v in parts.items()}
        out["activations"] = out["activations"].reshape(-1, self.d_model)
        if not include_dropped:
            del out["kept"], out["drop_reason"]
        return out

    def num_blocks(self) -> int:
        """Blocks (chunk-aligned row ranges of about 64 KiB) in the cache; the same for every layer."""
        return int(self._first_block[-1])

    def _block(self, index: int) -> _Block:
        shard = int(np.searchsorted(self._first_block, index, side="right")) - 1
        start = (index - int(self._first_block[shard])) * self._chunk_rows
        return _Block(shard, start, min(start + self._chunk_rows, self._shard_tokens[shard]))

    def blocks(self, layer: int) -> list[_Block]:
        """The blocks of a layer, in collection order (a list: for small caches)."""
        self._check_layer(layer)
        return [self._block(i) for i in range(self.num_blocks())]

    def _chunk_reader(self, layer: int, shard: int) -> _ChunkReader:
        key = (shard, layer)
        if key not in self._readers:
            ds = self._dataset(shard, f"layer_{layer}/activations")
            with self._reading(shard):
                self._readers[key] = _ChunkReader(self.shards[shard], ds, self._chunk_rows)
        return self._readers[key]

    def _read_blocks_into(self, layer: int, indices: np.ndarray, sink_multiple: float | None, out: np.ndarray, at: int) -> int:
        """Read the kept rows of blocks (global indices), as stored, into out[at:] in that order; returns
        the row after the last one written. Every chunk is checked as it is read: its checksum, or in a
        shard without checksums its values for NaN and Inf."""
        R = self._chunk_rows
        name = f"layer_{layer}/activations"
        shards = np.searchsorted(self._first_block, indices, side="right") - 1
        starts = (indices - self._first_block[shards]) * R
        self.blocks_read += len(indices)
        for shard, start in zip(shards.tolist(), starts.tolist(), strict=True):
            n = min(R, self._shard_tokens[shard] - start)
            chunk = out[at: at + n]
            try:
                self._chunk_reader(layer, shard).read(start, chunk)
            except (OSError, RuntimeError, ValueError) as err:
                raise self._damaged(shard, str(err).splitlines()[0]) from None
            found = self._sums(shard, name)
            if found is not None:
                if xxhash.xxh3_64_intdigest(chunk) != found[0][start // R]:
                    raise self._corrupt(shard, name, start, chunk, checksum=True)
            elif len(nonfinite_rows(chunk, self.store_dtype)):
                raise self._corrupt(shard, name, start, chunk, checksum=False)
            if self._keep_blocks(layer, shard, sink_multiple)[1][start // R] == n:
                at += n
                continue
            keep = self._keep_rows(layer, shard, start, start + n, sink_multiple)
            k = int(keep.sum())
            out[at: at + k] = chunk[keep]
            at += k
        return at

    def batches(
        self,
        layer: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sink_multiple: float | None = None,
        holdout_fraction: float = 0.0,
        split: str = "train",
        window_bytes: int = 256 << 20,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Kept activations of a layer as float32 tensors [batch_size, D], one pass.

        Shuffling: the blocks (chunk-aligned row ranges of about 64 KiB) are permuted (seeded), rank r
        of world_size takes every world_size-th block of that order, and blocks are read into a window
        of about window_bytes (in the stored dtype); each batch is a random draw without replacement
        from the window. So a batch is a uniform sample of a window, and a window a uniform sample of
        window_bytes / 64 KiB blocks of the cache (4096 with the defaults); a cache smaller than one
        window is shuffled exactly. Memory: one window, plus the block order (4 bytes a block). The
        last `holdout_fraction` of blocks (the end of the data stream) form split="holdout" and are
        never in split="train" ("all": both). sink_multiple re-applies the filter with another multiple
        (None: as collected). With drop_last, a final partial batch is dropped; without it, every kept
        token of the rank's share comes exactly once.
        """
        for x_BD, _ in self.positioned_batches(layer, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                               world_size=world_size, sink_multiple=sink_multiple,
                                               holdout_fraction=holdout_fraction, split=split,
                                               window_bytes=window_bytes, drop_last=drop_last):
            yield x_BD

    def positioned_batches(
        self,
        layer: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sink_multiple: float | None = None,
        holdout_fraction: float = 0.0,
        split: str = "train",
        window_bytes: int = 256 << 20,
        drop_last: bool = True,
        start: ReadPosition | None = None,
    ) -> Iterator[tuple[torch.Tensor, ReadPosition]]:
        """`batches`, each with the position after it: the same pass given `start=` that position goes on
        with the next batch, reading only the window that batch is in (one window_bytes), so a resume
        costs the same however far the pass got. The final partial batch (drop_last=False) has no
        position to resume from: its position is the end of the pass."""
        if split not in ("train", "holdout", "all"):
            raise ValueError(f"split must be train, holdout or all (got {split!r})")
        if self.bounded:  # its training shards are deleted as training consumes them: what is here is held out
            if split == "train":
                raise WorkbenchError(f"the cache at {self.root} is a bounded buffer: its training shards are deleted as "
                                     "training reads them, and only the held-out shards are kept; read split holdout")
            split, holdout_fraction = "all", 0.0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (got rank {rank}, world_size {world_size})")
        self._check_layer(layer)
        n_blocks = self.num_blocks()
        n_hold = int(np.ceil(holdout_fraction * n_blocks)) if holdout_fraction > 0 else 0
        first, stop = {"train": (0, n_blocks - n_hold), "holdout": (n_blocks - n_hold, n_blocks), "all": (0, n_blocks)}[split]
        rng = np.random.default_rng(seed)
        order = np.arange(first, stop, dtype=np.int32 if n_blocks < 2**31 else np.int64)
        if shuffle:
            rng.shuffle(order)
        mine = order[rank::world_size]
        dtype = STORE_NUMPY[self.store_dtype]
        per_window = max(1, window_bytes // (self._chunk_rows * self.d_model * np.dtype(dtype).itemsize))
        per_window = max(1, min(per_window, len(mine)))
        window = self._take_window((per_window * self._chunk_rows + batch_size, self.d_model), dtype)
        first_window, skip, carry_BD = 0, 0, window[:0]
        if start is not None:
            if start.blocks != len(mine) or start.per_window != per_window or start.batch_size != batch_size:
                raise ValueError(f"the read position is of another pass ({start.blocks} blocks, {start.per_window} a "
                                 f"window, batch {start.batch_size}; this one: {len(mine)}, {per_window}, {batch_size})")
            first_window, skip, carry_BD = start.window, start.batch, start.carry_BD
            rng.bit_generator.state = start.rng
        try:
            window[: len(carry_BD)] = carry_BD
            filled = len(carry_BD)  # rows in the window; the first ones are the previous window's remainder
            for w in range(first_window, len(mine), per_window):
                carry_BD = window[:filled].copy()  # what this window starts with: part of every position in it
                rng_state = rng.bit_generator.state
                filled = self._read_blocks_into(layer, mine[w: w + per_window], sink_multiple, window, filled)
                perm = rng.permutation(filled) if shuffle else np.arange(filled)
                n_full = filled // batch_size * batch_size
                for i in range(skip, n_full // batch_size):
                    x_BD = torch.from_numpy(from_stored(window[perm[i * batch_size: (i + 1) * batch_size]], self.store_dtype))
                    yield x_BD, ReadPosition(w, i + 1, rng_state, carry_BD, len(mine), per_window, batch_size)
                skip = 0
                rest = perm[n_full:]
                window[: len(rest)] = window[rest]
                filled = len(rest)
            if filled and not drop_last:
                yield (torch.from_numpy(from_stored(window[:filled].copy(), self.store_dtype)),
                       ReadPosition(len(mine), 0, rng.bit_generator.state, window[:0].copy(), len(mine), per_window,
                                    batch_size))
        finally:
            with self._lock:
                self._spare_windows = [window]  # keep one: memory stays bounded by the passes running

    def _take_window(self, shape: tuple[int, int], dtype) -> np.ndarray:
        """A window buffer: the one a finished pass left, if it has this shape (its pages are already
        mapped, which saves ~0.1 s per 256 MiB), else a new one. A buffer is never shared by two passes."""
        with self._lock:
            spare = self._spare_windows.pop() if self._spare_windows else None
        if spare is not None and spare.shape == shape and spare.dtype == dtype:
            return spare
        return np.empty(shape, dtype)

    def close(self) -> None:
        self._spare_windows.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._datasets.clear()
        for h5 in self._files.values():
            h5.close()
        self._files.clear()

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(iterator: Iterable, depth: int = 4, on_stop: Callable[[], None] | None = None) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead, so producing overlaps consuming.
    An exception in the iterator is re-raised in the consumer. When the consumer stops early (or fails,
    or is interrupted), the thread finishes its current item, closes the iterator and is joined before
    the consumer goes on: a thread left inside native code (a tokenizer, torch, HDF5) while the
    interpreter exits can abort the process. on_stop runs first when the consumer stops: it tells an iterator
    that waits for something (a bounded buffer's next shard) to give up, so that its thread can be joined."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    it = iter(iterator)

    def worker() -> None:
        try:
            while not stop.is_set():
                item = next(it, done)
                q.put(item)
                if item is done:
                    return
        except BaseException as err:  # re-raised in the consumer
            q.put(err)
        finally:
            if hasattr(it, "close"):
                it.close()

    thread = threading.Thread(target=worker, daemon=True, name="workbench-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        while thread.is_alive():
            while not q.empty():  # unblock a worker waiting to put
                q.get_nowait()
            thread.join(timeout=0.01)
