"""The HDF5 activation cache: the shard writer used by collection and `ActivationCache`, the reader.

Layout of a cache directory (every file readable with plain h5py; N = tokens of a shard, D = d_model):

    manifest.json                format, version, fingerprint and recipe (model, data, collect) that made
                                 it, layers, d_model, num_model_layers, model_dtype, store_dtype,
                                 chunk_rows, bos/pad token ids, requested_rows/requested_tokens, complete,
                                 shards [{file, num_tokens, num_batches, first_batch, bytes}], summary
                                 {tokens, sequences, shards, bytes, layers {L: {kept, first_token, sink}}}
    .lock                        held (flock) by the `workbench collect` writing the cache
    shards/shard_000000.h5       forward batches [i * shard_batches, (i + 1) * shard_batches)
        attrs: format, version, complete, shard_index, first_batch, num_batches, num_tokens, layers,
               d_model, store_dtype, chunk_rows, stats (JSON: tokens, sequences, per-layer counts),
               process_index, num_processes (which process of how many wrote it)
        tokens/token_id    int32   [N]   every non-padding token of the shard's sequences, in order
        tokens/sequence    int64   [N]   global sequence (row) index
        tokens/position    int32   [N]   position in the row
        tokens/batch       int32   [N]   global forward-batch index
        layer_<L>/activations  [N, D]    float32 | float16 | uint16 holding bfloat16 bits (attr dtype)
        layer_<L>/norm         float32 [N]   the L2 norm the sink filter used (float32 of the model output)
        layer_<L>/batch_median float32 [num_batches]   the filter's median of each forward batch
        layer_<L>/drop_reason  uint8 [N]  0 kept, 1 first token, 2 sink
        layer_<L>/kept         bool  [N]  drop_reason == 0
        xxh3/<dataset>         uint64 [blocks]  (format version 2) xxhash.xxh3_64 of each block of
                               `rows` (attr) rows of the dataset above, e.g. xxh3/layer_<L>/activations:
                               one per chunk; the last block holds the remaining rows

Tokens are stored sequence by sequence in collection order; padding is never stored, and neither is a
non-finite activation (collection stops instead). bfloat16 has no HDF5 type: its 16 bits are stored as
uint16 and restored exactly. With plain h5py:

    with h5py.File("cache/shards/shard_000000.h5", "r") as h5:
        acts = h5["layer_18/activations"][:]
        if h5["layer_18/activations"].attrs["dtype"] == "bfloat16":
            acts = (acts.astype(np.uint32) << 16).view(np.float32)
        acts = acts[h5["layer_18/kept"][:]]           # what training reads (sink filter applied)
        rows = h5["xxh3/layer_18/activations"].attrs["rows"]    # checking block i (pip: xxhash)
        xxhash.xxh3_64_intdigest(h5["layer_18/activations"][i * rows:(i + 1) * rows]) == h5["xxh3/layer_18/activations"][i]

Chunks: activations are chunked by `chunk_rows` whole rows (about 64 KiB: 8 rows of a 4096-wide bf16
model, 256 rows of a 64-wide fp32 one), uncompressed; a chunk is the unit the shuffled reader reads at
random, and small chunks give it many distinct places per window of memory. It reads a chunk with one
`pread` at the offset HDF5's chunk index gives, at 0.6-0.9x the speed of a plain sequential h5py read
(bench/reader_bench.py). The per-token vectors are chunked by a multiple of it (>= 4096 rows). The
writer buffers rows and writes chunk-aligned slabs (about 16 MiB a layer), so each chunk is written once.

Checksums: every block a reader takes (an activation chunk, a whole per-token vector) is checked against
its checksum before anything is returned, so a shard changed on disk after collection (bit rot, a bad copy,
a stray write into the data area that leaves the size unchanged) is reported by name, with its rows,
instead of read. HDF5's own fletcher32 filter is not used: a filtered chunk cannot be read with one
`pread`. Shards of format version 1 have no checksums: they are read with a check that every activation
is finite, and `workbench inspect --verify` says that it cannot verify them.

Crash safety: a shard is written under `shard_XXXXXX.h5.partial` and renamed when complete (after an
fsync), so a crash never leaves a shard that looks finished; the manifest is replaced atomically and says
`complete: true` only after every shard is in place. The reader checks each shard's size against the
manifest, so a truncated shard is reported by name instead of read; a shard that disagrees with the
manifest (layers, d_model, dtype, tokens) while agreeing with itself means a manifest edited by hand.
"""

from __future__ import annotations

import errno
import io
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import xxhash
from h5py import h5s

from workbench.errors import WorkbenchError
from workbench.files import fsync_dir, read_json_object, write_json
from workbench.sink import FIRST_TOKEN, SINK, is_sink

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"  # files.folder_lock's file: held by the `workbench collect` writing the cache
SHARD_DIR = "shards"
FORMAT = "workbench-activation-cache"
FORMAT_VERSION = 2  # 2: per-block checksums; caches of version 1 are still read
CHECKSUMS = "xxh3"  # the group of checksums (xxh3_64), one dataset per checksummed dataset
CHUNK_BYTES = 1 << 16  # activation chunk: the unit of a shuffled read (small: many places per window)
META_CHUNK_ROWS = 4096  # per-token vectors: at least this many rows a chunk
SLAB_CHUNKS = 256  # the writer buffers about this many activation chunks (16 MiB) per layer before writing
STORE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TOKEN_FIELDS = {"token_id": np.int32, "sequence": np.int64, "position": np.int32, "batch": np.int32}


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard_{index:06d}.h5"


def chunk_rows(d_model: int, store_dtype: str) -> int:
    """Rows per activation chunk: about CHUNK_BYTES of activations."""
    itemsize = np.dtype(STORE_NUMPY[store_dtype]).itemsize
    return max(1, CHUNK_BYTES // (d_model * itemsize))


def meta_chunk_rows(d_model: int, store_dtype: str) -> int:
    """Rows per chunk of the per-token vectors: a multiple of chunk_rows, at least META_CHUNK_ROWS."""
    rows = chunk_rows(d_model, store_dtype)
    return rows * -(-META_CHUNK_ROWS // rows)


def to_stored(acts_ND: torch.Tensor, store_dtype: str) -> np.ndarray:
    """Activations as the numpy array stored on disk; bfloat16 is kept bit-exact as uint16."""
    if store_dtype == "bfloat16":
        return acts_ND.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return acts_ND.to(getattr(torch, store_dtype)).numpy()


def nonfinite_rows(stored_ND: np.ndarray, store_dtype: str) -> np.ndarray:
    """Indices of the rows of stored activations [N, D] holding a NaN or an Inf."""
    if store_dtype == "bfloat16":  # exponent bits all ones
        bad_ND = (stored_ND & 0x7F80) == 0x7F80
    else:
        bad_ND = ~np.isfinite(stored_ND)
    return np.flatnonzero(bad_ND.any(axis=1))


def block_checksums(values: np.ndarray, rows: int) -> list[int]:
    """The checksum (xxh3_64) of each block of `rows` rows of a C-contiguous array (the last block may
    be shorter). xxh3 rather than zlib's crc32: it runs at memory speed (3-5 GB/s on the CI machines
    against crc32's 1-1.6), so checking every chunk a reader takes costs little next to reading it."""
    return [xxhash.xxh3_64_intdigest(values[i: i + rows]) for i in range(0, len(values), rows)]


def from_stored(arr_ND: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored activations as float32 (exact for every stored dtype)."""
    if store_dtype == "bfloat16":
        bits = arr_ND.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return arr_ND.astype(np.float32, copy=False)


def write_error(path: Path, err: OSError) -> WorkbenchError:
    """One clear line for a failed write (disk full, file size limit, permissions)."""
    text = (err.strerror or str(err).splitlines()[0]) if str(err) else type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        hint = "free disk space (or raise `ulimit -f`) and re-run the same command to resume"
    else:
        hint = "check that the directory is writable and re-run the same command to resume"
    return WorkbenchError(f"cannot write {path}: {text}; {hint} (completed shards are kept)")


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes a shard through. A failed write (disk full, `ulimit -f`) is recorded and
    reported to HDF5 as done, and every later write is dropped: an error raised inside HDF5 while it
    flushes or closes can crash the process, while this way it closes the doomed file cleanly and the
    writer, which checks `error` after every slab, deletes it and reports the original error."""

    def __init__(self, path: Path):
        super().__init__()
        self.fh = open(path, "w+b", buffering=0)  # closed by close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readinto(self, buffer) -> int:
        return self.fh.readinto(buffer)

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self.fh.write(data)
            except OSError as err:
                self.error = err
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.fh.truncate(size)
            except OSError as err:
                self.error = err
        return size or 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        super().close()


class ShardWriter:
    """Writes forward batches to one shard file; `finish()` marks it complete and renames it.

    Rows are buffered in memory and written in chunk-aligned slabs of about SLAB_CHUNKS activation
    chunks per layer, so memory stays bounded by one slab plus one forward batch.
    """

    def __init__(self, root: Path, index: int, first_batch: int, layers: list[int], d_model: int, store_dtype: str,
                 process: tuple[int, int] = (0, 1)):
        self.final = root / shard_name(index)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.layers = layers
        self.store_dtype = store_dtype
        self.num_tokens = 0  # rows appended
        self.num_batches = 0
        self._written = 0  # rows on disk
        self._pending: dict[str, list[np.ndarray]] = {}
        self._sums: dict[str, list[int]] = {}  # per dataset: the checksum of each block written so far
        self._sum_rows: dict[str, int] = {}  # rows a block: the dataset's chunk rows
        self._medians: dict[int, list[float]] = {layer: [] for layer in layers}
        rows = chunk_rows(d_model, store_dtype)
        meta = meta_chunk_rows(d_model, store_dtype)
        self.slab_rows = meta * -(-rows * SLAB_CHUNKS // meta)
        self.file: _GuardedFile | None = None
        self.h5: h5py.File | None = None
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.file = _GuardedFile(self.partial)
            # No chunk cache: every (whole) chunk goes to the file when written, so a failed write is
            # seen at the slab that caused it.
            self.h5 = h5 = h5py.File(self.file, "w", rdcc_nbytes=0)
            h5.attrs.update(shard_index=index, first_batch=first_batch, layers=layers, d_model=d_model,
                            store_dtype=store_dtype, chunk_rows=rows, complete=False, format=FORMAT,
                            version=FORMAT_VERSION, process_index=process[0], num_processes=process[1])
            for name, dtype in TOKEN_FIELDS.items():
                self._create(f"tokens/{name}", (0,), dtype, (meta,))
            for layer in layers:
                acts = self._create(f"layer_{layer}/activations", (0, d_model), STORE_NUMPY[store_dtype], (rows, d_model))
                acts.attrs["dtype"] = store_dtype
                self._create(f"layer_{layer}/norm", (0,), np.float32, (meta,))
                self._create(f"layer_{layer}/drop_reason", (0,), np.uint8, (meta,))
                self._create(f"layer_{layer}/kept", (0,), bool, (meta,))
        except (OSError, RuntimeError) as err:
            raise self._fail(err) from None
        if self.file.error is not None:
            raise self._fail(self.file.error)

    def _create(self, path: str, shape: tuple, dtype, chunks: tuple) -> h5py.Dataset:
        assert self.h5 is not None
        self._pending[path] = []
        self._sums[path] = []
        self._sum_rows[path] = chunks[0]
        return self.h5.create_dataset(path, shape, dtype, maxshape=(None, *shape[1:]), chunks=chunks)

    def append(self, tokens: dict[str, np.ndarray], per_layer: dict[int, dict[str, np.ndarray]]) -> None:
        """Add one forward batch: tokens = {token_id, sequence, position, batch} [N]; per_layer[L] =
        {activations [N, D] (stored dtype), norm [N], drop_reason [N], batch_median (a float)}."""
        for name, values in tokens.items():
            self._pending[f"tokens/{name}"].append(values)
        for layer, arrays in per_layer.items():
            g = f"layer_{layer}"
            self._pending[f"{g}/activations"].append(arrays["activations"])
            self._pending[f"{g}/norm"].append(arrays["norm"])
            self._pending[f"{g}/drop_reason"].append(arrays["drop_reason"])
            self._pending[f"{g}/kept"].append(arrays["drop_reason"] == 0)
            self._medians[layer].append(float(arrays["batch_median"]))
        self.num_tokens += len(tokens["token_id"])
        self.num_batches += 1
        if self.num_tokens - self._written >= self.slab_rows:
            self._write((self.num_tokens - self._written) // self.slab_rows * self.slab_rows)

    def _write(self, n: int) -> None:
        """Write the first n pending rows of every dataset (n is a whole number of chunks, or the rest)."""
        assert self.h5 is not None
        if n == 0:
            return
        start, stop = self._written, self._written + n
        try:
            for path, parts in self._pending.items():
                values = parts[0] if len(parts) == 1 else np.concatenate(parts)
                ds = self.h5[path]
                ds.resize(stop, axis=0)
                ds[start:stop] = values[:n]
                self._sums[path] += block_checksums(values[:n], self._sum_rows[path])  # start is a block boundary
                self._pending[path] = [values[n:]] if len(values) > n else []
            self.h5.flush()
        except (OSError, RuntimeError) as err:
            raise self._fail(err) from None
        if self.file is not None and self.file.error is not None:
            raise self._fail(self.file.error)
        self._written = stop

    def finish(self, stats: dict) -> int:
        """Write what is buffered, record the shard's statistics, mark it complete, fsync it and make it
        visible under its final name. Returns the file's size in bytes."""
        assert self.h5 is not None and self.file is not None
        self._write(self.num_tokens - self._written)
        try:
            for layer, medians in self._medians.items():
                path, values = f"layer_{layer}/batch_median", np.asarray(medians, np.float32)
                self.h5.create_dataset(path, data=values)
                self._sums[path], self._sum_rows[path] = block_checksums(values, len(values)), len(values)
            for path, sums in self._sums.items():
                ds = self.h5.create_dataset(f"{CHECKSUMS}/{path}", data=np.asarray(sums, np.uint64))
                ds.attrs["rows"] = self._sum_rows[path]
            self.h5.attrs.update(num_batches=self.num_batches, num_tokens=self.num_tokens,
                                 stats=json.dumps(stats), complete=True)
            self.h5.close()
            self.h5 = None
            if self.file.error is not None:
                raise self.file.error
            os.fsync(self.file.fh.fileno())
            self.file.close()
            os.replace(self.partial, self.final)
            fsync_dir(self.final.parent)
            return self.final.stat().st_size
        except (OSError, RuntimeError) as err:
            raise self._fail(err) from None

    def _fail(self, err: Exception) -> WorkbenchError:
        """Remove the partial file and describe the first underlying OS error."""
        original = self.file.error if self.file is not None and self.file.error is not None else err
        self.abort()
        if isinstance(original, OSError):
            return write_error(self.partial, original)
        return WorkbenchError(f"cannot write {self.partial}: {str(original).splitlines()[0]}; "
                              "re-run the same command to resume (completed shards are kept)")

    def abort(self) -> None:
        """Drop the shard being written: close what is open and delete the partial file."""
        if self.h5 is not None:
            try:
                self.h5.close()
            except Exception:  # the file may be unusable after the very error we handle
                pass
            self.h5 = None
        if self.file is not None:
            self.file.close()
        self.partial.unlink(missing_ok=True)


def shard_is_complete(path: Path, size: int | None = None) -> bool:
    """A shard counts only under its final name, readable, with complete=True (and the recorded size)."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False))
    except OSError:
        return False


def _manifest_fix(root: Path) -> str:
    return f"restore it, or delete {root} and run `workbench collect` again"


def read_manifest(root: Path) -> dict | None:
    """A cache directory's manifest (None when it has none), checked: one line naming manifest.json for
    one that is not JSON, not an object, from a newer workbench, or hand-edited into something unusable.
    Whether it is an activation-cache manifest at all (`format`) is the caller's to say."""
    path = root / MANIFEST
    manifest = read_json_object(path, _manifest_fix(root))
    if manifest is None or manifest.get("format") != FORMAT:
        return manifest
    version = manifest.get("version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise WorkbenchError(f"{path} is cache format version {version}, newer than this workbench reads "
                             f"({FORMAT_VERSION}); upgrade the workbench")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise WorkbenchError(f"{path} is not a usable cache manifest ({problem}): it was edited or damaged; "
                             f"{_manifest_fix(root)}")
    return manifest


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_MANIFEST_FIELDS = {  # key: (test, what it must be)
    "version": (lambda x: _is_int(x) and x >= 1, "a format version"),
    "fingerprint": (lambda x: isinstance(x, str), "a string"),
    "layers": (lambda x: isinstance(x, list) and len(x) > 0 and all(_is_int(v) and v >= 0 for v in x),
               "a list of layer indices"),
    "d_model": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "num_model_layers": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "store_dtype": (lambda x: x in STORE_NUMPY, f"one of {', '.join(STORE_NUMPY)}"),
    "model_dtype": (lambda x: isinstance(x, str), "a string"),
    "requested_rows": (lambda x: _is_int(x) and x >= 0, "a count"),
    "complete": (lambda x: isinstance(x, bool), "true or false"),
}
_RECIPE_FIELDS = {
    ("model", "name"): lambda x: isinstance(x, str),
    ("data", "path"): lambda x: isinstance(x, str),
    ("data", "context_length"): lambda x: _is_int(x) and x > 0,
    ("data", "packing"): lambda x: isinstance(x, bool),
    ("collect", "sink_multiple"): lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)),
    ("collect", "sink_median"): lambda x: isinstance(x, str),
    ("collect", "drop_first_token"): lambda x: isinstance(x, bool),
}
_COUNT = (lambda x: _is_int(x) and x >= 0, "a count")


def _manifest_problem(m: dict) -> str | None:
    """What makes a cache manifest unusable, in a few words, or None."""
    for key, (ok, what) in _MANIFEST_FIELDS.items():
        if not ok(m.get(key)):
            return f"{key} is {json.dumps(m.get(key))[:40]}, not {what}"
    recipe = m.get("recipe")
    for (section, key), ok in _RECIPE_FIELDS.items():
        if not isinstance(recipe, dict) or not isinstance(recipe.get(section), dict) or not ok(recipe[section].get(key)):
            return f"recipe.{section}.{key} is missing or wrong"
    if not m["complete"]:
        return None
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        return "shards is not a list of shards"
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("file") != shard_name(i):
            return f"shards[{i}] is not the entry of {shard_name(i)}"
        for key in ("num_tokens", "num_batches", "first_batch", *(("bytes",) if s.get("bytes") is not None else ())):
            if not _COUNT[0](s.get(key)):
                return f"shards[{i}].{key} is {json.dumps(s.get(key))[:40]}, not a count"
    summary = m.get("summary")
    if not isinstance(summary, dict) or not all(_COUNT[0](summary.get(k)) for k in ("tokens", "sequences", "shards", "bytes")):
        return "summary is missing or not counts"
    per_layer = summary.get("layers")
    for layer in m["layers"]:
        counts = per_layer.get(str(layer)) if isinstance(per_layer, dict) else None
        if not isinstance(counts, dict) or not all(_COUNT[0](counts.get(k)) for k in ("kept", "first_token", "sink")):
            return f"summary.layers has no counts for layer {layer}, which layers lists"
    return None


def write_json_atomic(path: Path, data: dict) -> None:
    write_json(path, data, resume="re-run the same command to resume (completed shards are kept)")


def shard_expectations(manifest: dict, index: int) -> dict:
    """What the manifest says shard `index` holds, as `shard_problems` compares it."""
    return {"layers": list(manifest["layers"]), "d_model": manifest["d_model"], "store_dtype": manifest["store_dtype"],
            "num_tokens": manifest["shards"][index]["num_tokens"]}


def shard_problems(h5: h5py.File, expect: dict) -> tuple[str | None, str | None]:
    """(damaged, mismatch) for an open shard. damaged: why the file itself is unusable (unfinished, its
    datasets or checksums not what its own attributes say): redo it. mismatch: the shard is whole but
    disagrees with the manifest (expect: layers, d_model, store_dtype, num_tokens): the manifest is wrong."""
    a = h5.attrs
    if not a.get("complete", False):
        return "it is not marked complete", None
    n, d, layers = int(a["num_tokens"]), int(a["d_model"]), [int(x) for x in a["layers"]]
    shapes = {f"tokens/{name}": (n,) for name in TOKEN_FIELDS}
    for layer in layers:
        shapes |= {f"layer_{layer}/{name}": (n,) for name in ("norm", "drop_reason", "kept")}
        shapes |= {f"layer_{layer}/activations": (n, d), f"layer_{layer}/batch_median": (int(a["num_batches"]),)}
    for name, shape in shapes.items():
        if not isinstance(h5.get(name), h5py.Dataset) or h5[name].shape != shape:
            return f"{name} is missing or not of the shard's own size", None
        if int(a.get("version", 1)) >= 2:
            sums = h5.get(f"{CHECKSUMS}/{name}")
            if not isinstance(sums, h5py.Dataset) or sums.shape != (-(-shape[0] // max(1, int(sums.attrs.get("rows", 0)))),):
                return f"the checksums of {name} are missing", None
    found = {"layers": layers, "d_model": d, "store_dtype": str(a["store_dtype"]), "num_tokens": n}
    diffs = [f"{key} {expect[key]} in the manifest, {found[key]} in the shard" for key in expect if expect[key] != found[key]]
    return None, "; ".join(diffs) or None


def manifest_mismatch(root: Path, shard: Path, what: str) -> WorkbenchError:
    """A shard that is whole but disagrees with the manifest: the manifest is what changed."""
    return WorkbenchError(f"{root / MANIFEST} does not match {shard} ({what}): the manifest was edited or comes "
                          f"from another cache; {_manifest_fix(root)}")


@dataclass
class ShardCheck:
    """What `verify_shard` found: damaged (why the shard must be redone) or mismatch (how it disagrees
    with the manifest), and whether every checksum was read and matched (False: no checksums, format 1)."""

    damaged: str | None = None
    mismatch: str | None = None
    verified: bool = False


VERIFY_ROWS_BYTES = 16 << 20  # verify_shard reads a dataset in slabs of about this many bytes


def verify_shard(path: Path, size: int | None, expect: dict) -> ShardCheck:
    """Read a whole shard and check it: present, of the recorded size, HDF5, complete, consistent with
    itself and with `expect` (see shard_problems), and every block of every dataset against its checksum."""
    if not path.is_file():
        return ShardCheck(damaged="it is missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        return ShardCheck(damaged=f"it is truncated or damaged ({actual:,} bytes, the manifest says {size:,})")
    try:
        with h5py.File(path, "r") as h5:
            damaged, mismatch = shard_problems(h5, expect)
            if damaged or mismatch or CHECKSUMS not in h5:
                return ShardCheck(damaged, mismatch)
            names: list[str] = []
            h5[CHECKSUMS].visit(lambda name: names.append(name) if isinstance(h5[CHECKSUMS][name], h5py.Dataset) else None)
            for name in names:
                ds, sums = h5[name], h5[f"{CHECKSUMS}/{name}"]
                rows, stored = int(sums.attrs["rows"]), sums[:]
                step = rows * max(1, VERIFY_ROWS_BYTES // max(1, rows * ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
                for start in range(0, ds.shape[0], step):
                    got = block_checksums(ds[start: start + step], rows)
                    bad = np.flatnonzero(np.asarray(got, np.uint64) != stored[start // rows: start // rows + len(got)])
                    if len(bad):
                        first = start + int(bad[0]) * rows
                        return ShardCheck(damaged=f"{name} rows {first}..{min(first + rows, ds.shape[0]) - 1} do not "
                                                  "match their checksum")
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        return ShardCheck(damaged=f"it is not a readable HDF5 shard ({(str(err).splitlines() or [type(err).__name__])[0]})")
    return ShardCheck(verified=True)


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
        manifest = read_manifest(self.root)
        if manifest is None:
            raise WorkbenchError(f"no activation cache at {self.root} (no {MANIFEST}); run `workbench collect` first, "
                                 "or give the directory it wrote (collect.out)")
        if manifest.get("format") != FORMAT:
            raise WorkbenchError(f"{self.root / MANIFEST} is not an activation-cache manifest; give the directory "
                                 "`workbench collect` wrote (collect.out)")
        if not manifest.get("complete"):
            raise WorkbenchError(f"the cache at {self.root} is incomplete; re-run the same `workbench collect` command to finish it")
        self.manifest = manifest
        self.layers: list[int] = list(manifest["layers"])
        self.d_model: int = int(manifest["d_model"])
        self.store_dtype: str = manifest["store_dtype"]
        self.drop_first_token: bool = bool(manifest["recipe"]["collect"]["drop_first_token"])
        self.sink_multiple: float | None = manifest["recipe"]["collect"]["sink_multiple"]
        self.shards = [self.root / s["file"] for s in manifest["shards"]]
        self._shard_tokens = [int(s["num_tokens"]) for s in manifest["shards"]]
        self._shard_bytes = [s.get("bytes") for s in manifest["shards"]]
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
                    damaged, mismatch = shard_problems(h5, shard_expectations(self.manifest, shard))
                except BaseException:
                    h5.close()
                    raise
            if damaged or mismatch:
                h5.close()
                raise self._damaged(shard, damaged) if damaged else manifest_mismatch(self.root, path, mismatch)
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
            return int(self.manifest["summary"]["layers"][str(layer)]["kept"])
        return sum(int(self._keep(layer, shard, sink_multiple).sum()) for shard in range(len(self.shards)))

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
        batch = self.read_vector(shard, "tokens/batch") - int(self._h5(shard).attrs["first_batch"])
        norms = self.read_vector(shard, f"{g}/norm")
        first = self.read_vector(shard, f"{g}/drop_reason") == FIRST_TOKEN
        medians = self._batch_medians(layer, shard)[batch]
        sink = is_sink(torch.from_numpy(norms), torch.from_numpy(medians), sink_multiple).numpy()
        return ~first & ~sink if self.drop_first_token else ~sink

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
                reason = np.where(keep, 0, np.where(reason == FIRST_TOKEN, FIRST_TOKEN, SINK)).astype(np.uint8)
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
        if split not in ("train", "holdout", "all"):
            raise ValueError(f"split must be train, holdout or all (got {split!r})")
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
        try:
            filled = 0  # rows in the window; the first ones are the previous window's remainder
            for w in range(0, len(mine), per_window):
                filled = self._read_blocks_into(layer, mine[w: w + per_window], sink_multiple, window, filled)
                perm = rng.permutation(filled) if shuffle else np.arange(filled)
                n_full = filled // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    yield torch.from_numpy(from_stored(window[perm[start: start + batch_size]], self.store_dtype))
                rest = perm[n_full:]
                window[: len(rest)] = window[rest]
                filled = len(rest)
            if filled and not drop_last:
                yield torch.from_numpy(from_stored(window[:filled].copy(), self.store_dtype))
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


def prefetch(iterator: Iterable, depth: int = 4) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead, so producing overlaps consuming.
    An exception in the iterator is re-raised in the consumer. When the consumer stops early (or fails,
    or is interrupted), the thread finishes its current item, closes the iterator and is joined before
    the consumer goes on: a thread left inside native code (a tokenizer, torch, HDF5) while the
    interpreter exits can abort the process."""
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
        while thread.is_alive():
            while not q.empty():  # unblock a worker waiting to put
                q.get_nowait()
            thread.join(timeout=0.01)
