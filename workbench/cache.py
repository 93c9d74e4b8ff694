"""The HDF5 activation cache: the shard writer used by collection and `ActivationCache`, the reader.

Layout of a cache directory (every file readable with plain h5py):

    manifest.json                the recipe that made it, layers, d_model, dtype, shards, summary
    shards/shard_000000.h5       one file per `collect.shard_batches` forward batches
        attrs: complete, shard_index, first_batch, num_batches, layers, d_model, store_dtype
        tokens/token_id    int32   [N]   every non-padding token of the shard's sequences
        tokens/sequence    int64   [N]   global sequence (row) index
        tokens/position    int32   [N]   position in the row
        tokens/batch       int32   [N]   global forward-batch index
        layer_<L>/activations  [N, D]    float32 | float16 | uint16 holding bfloat16 bits (attr dtype)
        layer_<L>/norm         float32 [N]   the norm the sink filter used
        layer_<L>/batch_median float32 [num_batches]   the filter's median of each forward batch
        layer_<L>/drop_reason  uint8 [N]  0 kept, 1 first token, 2 sink
        layer_<L>/kept         bool  [N]  drop_reason == 0

Shards are written under a `.partial` name and renamed when complete, so a crash never leaves a shard
that looks finished. Activation chunks are a whole number of rows (about 1 MiB), the unit of the
shuffled reader.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.sink import FIRST_TOKEN, SINK, is_sink

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FORMAT = "workbench-activation-cache"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20
STORE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard_{index:06d}.h5"


def chunk_rows(d_model: int, store_dtype: str) -> int:
    """Rows per HDF5 chunk: about CHUNK_BYTES of activations."""
    itemsize = np.dtype(STORE_NUMPY[store_dtype]).itemsize
    return max(1, CHUNK_BYTES // (d_model * itemsize))


def to_stored(acts_ND: torch.Tensor, store_dtype: str) -> np.ndarray:
    """Activations as the numpy array stored on disk; bfloat16 is kept bit-exact as uint16."""
    if store_dtype == "bfloat16":
        return acts_ND.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return acts_ND.to(getattr(torch, store_dtype)).numpy()


def from_stored(arr_ND: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored activations as float32 (exact for every stored dtype)."""
    if store_dtype == "bfloat16":
        return (arr_ND.astype(np.uint32) << 16).view(np.float32)
    return arr_ND.astype(np.float32, copy=False)


def write_error(path: Path, err: OSError) -> WorkbenchError:
    """One clear line for a failed write (disk full, file size limit, permissions)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EFBIG) or "space" in text or "too large" in text.lower():
        hint = "free disk space (or raise `ulimit -f`) and re-run the same command to resume"
    else:
        hint = "check that the directory is writable and re-run the same command to resume"
    return WorkbenchError(f"cannot write {path}: {text}; {hint} (completed shards are kept)")


class ShardWriter:
    """Appends forward batches to one shard file; `finish()` marks it complete and renames it."""

    def __init__(self, root: Path, index: int, first_batch: int, layers: list[int], d_model: int, store_dtype: str):
        self.final = root / shard_name(index)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.layers = layers
        self.store_dtype = store_dtype
        self.num_tokens = 0
        self.num_batches = 0
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.h5 = h5py.File(self.partial, "w")
            h5 = self.h5
            h5.attrs.update(shard_index=index, first_batch=first_batch, layers=layers, d_model=d_model,
                            store_dtype=store_dtype, complete=False, format=FORMAT, version=FORMAT_VERSION)
            rows = chunk_rows(d_model, store_dtype)
            meta_chunk = (max(rows, 4096),)
            for name, dtype in (("token_id", np.int32), ("sequence", np.int64), ("position", np.int32), ("batch", np.int32)):
                h5.create_dataset(f"tokens/{name}", (0,), dtype, maxshape=(None,), chunks=meta_chunk)
            for layer in layers:
                g = h5.create_group(f"layer_{layer}")
                acts = g.create_dataset("activations", (0, d_model), STORE_NUMPY[store_dtype],
                                        maxshape=(None, d_model), chunks=(rows, d_model))
                acts.attrs["dtype"] = store_dtype
                g.create_dataset("norm", (0,), np.float32, maxshape=(None,), chunks=meta_chunk)
                g.create_dataset("drop_reason", (0,), np.uint8, maxshape=(None,), chunks=meta_chunk)
                g.create_dataset("kept", (0,), bool, maxshape=(None,), chunks=meta_chunk)
                g.create_dataset("batch_median", (0,), np.float32, maxshape=(None,), chunks=(1024,))
        except OSError as err:
            self.abort()
            raise write_error(self.partial, err) from None

    def append(self, tokens: dict[str, np.ndarray], per_layer: dict[int, dict[str, np.ndarray]]) -> None:
        """Add one forward batch: tokens = {token_id, sequence, position, batch} [N]; per_layer[L] =
        {activations [N, D] (stored dtype), norm [N], drop_reason [N], batch_median [1]}."""
        n = len(tokens["token_id"])
        start, stop = self.num_tokens, self.num_tokens + n
        try:
            for name, values in tokens.items():
                _append(self.h5[f"tokens/{name}"], values, start, stop)
            for layer, arrays in per_layer.items():
                g = self.h5[f"layer_{layer}"]
                _append(g["activations"], arrays["activations"], start, stop)
                _append(g["norm"], arrays["norm"], start, stop)
                _append(g["drop_reason"], arrays["drop_reason"], start, stop)
                _append(g["kept"], arrays["drop_reason"] == 0, start, stop)
                _append(g["batch_median"], arrays["batch_median"], self.num_batches, self.num_batches + 1)
        except OSError as err:
            self.abort()
            raise write_error(self.partial, err) from None
        self.num_tokens = stop
        self.num_batches += 1

    def finish(self, stats: dict) -> None:
        """Record the shard's statistics, mark it complete, and make it visible under its final name."""
        try:
            self.h5.attrs.update(num_batches=self.num_batches, num_tokens=self.num_tokens,
                                 stats=json.dumps(stats), complete=True)
            self.h5.flush()
            self.h5.close()
            with open(self.partial, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.partial, self.final)
        except OSError as err:
            self.abort()
            raise write_error(self.partial, err) from None

    def abort(self) -> None:
        h5 = getattr(self, "h5", None)
        if h5 is not None:
            try:
                h5.close()
            except Exception:  # the file may be unusable after the very error we are handling
                pass
        self.partial.unlink(missing_ok=True)


def _append(ds: h5py.Dataset, values: np.ndarray, start: int, stop: int) -> None:
    ds.resize(stop, axis=0)
    ds[start:stop] = values


def shard_is_complete(path: Path) -> bool:
    """A shard counts only under its final name, readable, with complete=True."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False))
    except OSError:
        return False


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise WorkbenchError(f"{path} is corrupt (not JSON); delete the cache directory and collect again") from None


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None


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
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise WorkbenchError(f"no activation cache at {self.root} (no {MANIFEST}); run `workbench collect` first")
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
        self._files: dict[int, h5py.File] = {}

    def _h5(self, shard: int) -> h5py.File:
        if shard not in self._files:
            path = self.shards[shard]
            try:
                h5 = h5py.File(path, "r")
            except (OSError, FileNotFoundError) as err:
                raise WorkbenchError(f"cannot read cache shard {path}: {str(err).splitlines()[0]}; "
                                     "the file is missing, truncated or corrupt: delete it and re-run `workbench collect` to redo it") from None
            if not h5.attrs.get("complete", False) or int(h5.attrs.get("num_tokens", -1)) != self._shard_tokens[shard]:
                h5.close()
                raise WorkbenchError(f"cache shard {path} does not match the manifest; delete it and re-run `workbench collect`")
            self._files[shard] = h5
        return self._files[shard]

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise WorkbenchError(f"layer {layer} is not in the cache at {self.root} (it has layers {self.layers})")

    def num_tokens(self, layer: int) -> int:
        """Kept tokens of a layer (as collected)."""
        self._check_layer(layer)
        return int(self.manifest["summary"]["layers"][str(layer)]["kept"])

    def _keep(self, g: h5py.Group, sl: slice, sink_multiple: float | None, first_batch: int) -> np.ndarray:
        """Kept flags for rows `sl`: as collected, or re-filtered with another multiple."""
        if sink_multiple is None:
            return g["kept"][sl]
        reason = g["drop_reason"][sl]
        batch = g.file["tokens/batch"][sl]
        medians = g["batch_median"][:][batch - first_batch]
        sink = is_sink(torch.from_numpy(g["norm"][sl]), torch.from_numpy(medians), sink_multiple).numpy()
        return (reason != FIRST_TOKEN) & ~sink if self.drop_first_token else ~sink

    def read(self, layer: int, include_dropped: bool = False, sink_multiple: float | None = None) -> dict[str, np.ndarray]:
        """Every token of a layer as numpy arrays (loads the whole layer: for small caches).

        Returns activations [N, D] float32, token_ids, sequence, position; with include_dropped also
        kept [N] and drop_reason [N] (0 kept, 1 first token, 2 sink) for every stored token.
        """
        self._check_layer(layer)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("activations", "token_ids", "sequence", "position", "kept", "drop_reason")}
        for shard in range(len(self.shards)):
            h5 = self._h5(shard)
            g = h5[f"layer_{layer}"]
            everything = slice(0, h5.attrs["num_tokens"])
            keep = self._keep(g, everything, sink_multiple, int(h5.attrs["first_batch"]))
            reason = g["drop_reason"][everything]
            if sink_multiple is not None:
                reason = np.where(keep, 0, np.where(reason == FIRST_TOKEN, FIRST_TOKEN, SINK)).astype(np.uint8)
            rows = slice(None) if include_dropped else keep
            parts["activations"].append(from_stored(g["activations"][everything], self.store_dtype)[rows])
            parts["token_ids"].append(h5["tokens/token_id"][everything][rows])
            parts["sequence"].append(h5["tokens/sequence"][everything][rows])
            parts["position"].append(h5["tokens/position"][everything][rows])
            parts["kept"].append(keep[rows])
            parts["drop_reason"].append(reason[rows])
        out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        if not include_dropped:
            del out["kept"], out["drop_reason"]
        return out

    def blocks(self, layer: int) -> list[_Block]:
        """The chunk-aligned row ranges of a layer, in collection order."""
        self._check_layer(layer)
        rows = chunk_rows(self.d_model, self.store_dtype)
        return [_Block(shard, start, min(start + rows, n))
                for shard, n in enumerate(self._shard_tokens) for start in range(0, n, rows)]

    def _read_block(self, layer: int, block: _Block, sink_multiple: float | None) -> np.ndarray:
        h5 = self._h5(block.shard)
        g = h5[f"layer_{layer}"]
        sl = slice(block.start, block.stop)
        keep = self._keep(g, sl, sink_multiple, int(h5.attrs["first_batch"]))
        acts = from_stored(g["activations"][sl], self.store_dtype)
        return acts[keep]

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

        Shuffling: the chunk-aligned blocks are permuted (seeded), rank r of world_size takes every
        world_size-th block, and blocks are read into windows of about window_bytes whose rows are
        permuted before being cut into batches; so a batch mixes tokens from hundreds of random places
        with bounded memory. The last `holdout_fraction` of blocks (the end of the data stream) form
        split="holdout" and are never in split="train". sink_multiple re-applies the filter with another
        multiple (None: as collected). With drop_last, a final partial batch is dropped.
        """
        if split not in ("train", "holdout", "all"):
            raise ValueError(f"split must be train, holdout or all (got {split!r})")
        blocks = self.blocks(layer)
        n_hold = int(np.ceil(holdout_fraction * len(blocks))) if holdout_fraction > 0 else 0
        if split == "train":
            blocks = blocks[: len(blocks) - n_hold]
        elif split == "holdout":
            blocks = blocks[len(blocks) - n_hold:]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
        mine = [blocks[i] for i in order[rank::world_size]]
        block_bytes = chunk_rows(self.d_model, self.store_dtype) * self.d_model * 4
        per_window = max(1, window_bytes // block_bytes)
        carry = np.zeros((0, self.d_model), np.float32)
        for w in range(0, len(mine), per_window):
            window = np.concatenate([carry, *(self._read_block(layer, b, sink_multiple) for b in mine[w: w + per_window])])
            if shuffle:
                window = window[rng.permutation(len(window))]
            n_full = len(window) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield torch.from_numpy(window[start: start + batch_size])
            carry = window[n_full:]
        if len(carry) and not drop_last:
            yield torch.from_numpy(carry)

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()
        self._files.clear()

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(iterator: Iterator[torch.Tensor], depth: int = 4) -> Iterator[torch.Tensor]:
    """Run an iterator in a background thread, `depth` items ahead, so reading overlaps compute."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
