"""The cache's shard writer: `ShardWriter` writes forward batches into one shard file in the layout of
layout.py, with its checksums, under a `.partial` name renamed when complete; `_GuardedFile` keeps a
failed write (disk full, `ulimit -f`) from crashing HDF5; `write_error` is the one line for a failed write."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np

from workbench.cache.layout import (
    CHECKSUMS,
    FORMAT,
    FORMAT_VERSION,
    LAYER_FIELDS,
    MEDIAN_DTYPE,
    STORE_NUMPY,
    TOKEN_FIELDS,
    block_checksums,
    chunk_rows,
    meta_chunk_rows,
    shard_name,
)
from workbench.errors import WorkbenchError
from workbench.files import fsync_dir

SLAB_CHUNKS = 256  # the writer buffers about this many activation chunks (16 MiB) per layer before writing


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
                for name, dtype in LAYER_FIELDS.items():
                    self._create(f"layer_{layer}/{name}", (0,), dtype, (meta,))
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
                path, values = f"layer_{layer}/batch_median", np.asarray(medians, MEDIAN_DTYPE)
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
