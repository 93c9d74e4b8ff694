"""The HDF5 activation cache's on-disk layout: what a cache directory holds, and the one place that says so.

Here: the file and dataset names, their dtypes, the stored-dtype codec, chunk sizing, block checksums,
the manifest (`Manifest`: created, checked, reopened and finalised), the statistics it records
(`LayerStats`, `Summary`), the checks of a shard against itself and the manifest, and the size formula
`workbench plan` uses. The writer (writer.py) and the reader (reader.py) follow it.

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

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import xxhash

from workbench.errors import WorkbenchError
from workbench.files import read_json_object, write_json

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"  # files.folder_lock's file: held by the `workbench collect` writing the cache
SHARD_DIR = "shards"
FORMAT = "workbench-activation-cache"
FORMAT_VERSION = 2  # 2: per-block checksums; caches of version 1 are still read
CHECKSUMS = "xxh3"  # the group of checksums (xxh3_64), one dataset per checksummed dataset
CHUNK_BYTES = 1 << 16  # activation chunk: the unit of a shuffled read (small: many places per window)
META_CHUNK_ROWS = 4096  # per-token vectors: at least this many rows a chunk
STORE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TOKEN_FIELDS = {"token_id": np.int32, "sequence": np.int64, "position": np.int32, "batch": np.int32}
LAYER_FIELDS = {"norm": np.float32, "drop_reason": np.uint8, "kept": np.bool_}  # per token, beside the activations
MEDIAN_DTYPE = np.float32  # layer_<L>/batch_median, one per forward batch
LAYER_COUNTS = ("kept", "first_token", "sink")  # the per-layer statistics of a shard and of the cache


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard_{index:06d}.h5"


def manifest_path(root: str | Path) -> Path:
    """Where a cache directory's manifest is."""
    return Path(root) / MANIFEST


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


# The size formula (`workbench plan`): the datasets above, uncompressed, without HDF5's own overhead.
TOKEN_BYTES = sum(np.dtype(t).itemsize for t in TOKEN_FIELDS.values())  # per token
LAYER_TOKEN_BYTES = sum(np.dtype(t).itemsize for t in LAYER_FIELDS.values())  # per token per layer, besides activations
MEDIAN_BYTES = np.dtype(MEDIAN_DTYPE).itemsize  # per forward batch per layer


def store_itemsize(store_dtype: str) -> int:
    """Bytes of one stored activation value."""
    return np.dtype(STORE_NUMPY[store_dtype]).itemsize


def layer_bytes(tokens: int, batches: int, d_model: int, store_dtype: str) -> int:
    """Bytes of one layer's datasets: activations and per-token vectors, and the batch medians."""
    return tokens * (d_model * store_itemsize(store_dtype) + LAYER_TOKEN_BYTES) + batches * MEDIAN_BYTES


def cache_bytes(tokens: int, batches: int, d_model: int, store_dtype: str, num_layers: int) -> int:
    """Bytes of a cache's datasets: the token vectors and every layer's (see layer_bytes)."""
    return tokens * TOKEN_BYTES + num_layers * layer_bytes(tokens, batches, d_model, store_dtype)


def shard_stats(layers: list[int]) -> dict:
    """The statistics a shard records (its `stats` attribute), zeroed: tokens, sequences, per-layer counts."""
    return {"tokens": 0, "sequences": 0, "layers": {str(L): dict.fromkeys(LAYER_COUNTS, 0) for L in layers}}


@dataclass
class LayerStats:
    kept: int = 0
    first_token: int = 0
    sink: int = 0

    def add(self, other: dict) -> None:
        self.kept += other["kept"]
        self.first_token += other["first_token"]
        self.sink += other["sink"]


@dataclass
class Summary:
    """What a cache holds (tokens = stored, i.e. non-padding, tokens) and, for this run, its speed."""

    tokens: int = 0
    sequences: int = 0
    shards: int = 0
    bytes: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)
    requested_rows: int = 0
    context_length: int = 0
    seconds: float = 0.0  # this run's collection loop (0 when nothing was left to do)
    tokens_this_run: int = 0  # tokens of the shards this run wrote

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "sequences": self.sequences, "shards": self.shards, "bytes": self.bytes,
                "layers": {str(k): vars(v) for k, v in self.layers.items()}}

    @property
    def ran_out(self) -> bool:
        return 0 < self.sequences < self.requested_rows

    def table(self) -> str:
        lines = [f"tokens read {self.tokens:,} in {self.sequences:,} sequences, {self.shards} shards, "
                 f"{self.bytes / 2**20:,.1f} MiB written"]
        if self.seconds > 0:
            lines[0] += f"; this run {self.tokens_this_run:,} tokens in {self.seconds:,.1f} s " \
                        f"({self.tokens_this_run / self.seconds:,.0f} tokens/s)"
        lines.append(f"{'layer':>6} {'kept':>12} {'first token':>12} {'sinks':>10} {'sink %':>8}")
        for layer, s in sorted(self.layers.items()):
            pct = 100 * s.sink / max(self.tokens, 1)
            lines.append(f"{layer:>6} {s.kept:>12,} {s.first_token:>12,} {s.sink:>10,} {pct:>7.3f}%")
        if self.ran_out:
            lines.append(f"warning: the data ran out: {self.sequences:,} of the {self.requested_rows:,} requested rows "
                         f"(data.num_tokens {self.requested_rows * self.context_length:,}) were read; "
                         "add data or lower data.num_tokens")
        return "\n".join(lines)


def _manifest_fix(root: Path) -> str:
    return f"restore it, or delete {root} and run `workbench collect` again"


@dataclass
class Manifest:
    """A cache directory's manifest.json, created, checked, reopened and finalised here and nowhere else.

    `data` is the JSON object as it is on disk, its keys in their order: a manifest written by an older
    workbench (without chunk_rows or the token ids) is rewritten with exactly the keys it had."""

    root: Path
    data: dict

    @property
    def path(self) -> Path:
        return manifest_path(self.root)

    @property
    def is_cache(self) -> bool:
        """Whether it is an activation-cache manifest at all (`format`)."""
        return self.data.get("format") == FORMAT

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @classmethod
    def read(cls, root: Path) -> Manifest | None:
        """A cache directory's manifest (None when it has none), checked: one line naming manifest.json for
        one that is not JSON, not an object, from a newer workbench, or hand-edited into something unusable.
        Whether it is an activation-cache manifest at all (`is_cache`) is the caller's to say."""
        path = manifest_path(root)
        data = read_json_object(path, _manifest_fix(root))
        if data is None:
            return None
        manifest = cls(root, data)
        if not manifest.is_cache:
            return manifest
        version = data.get("version")
        if _is_int(version) and version > FORMAT_VERSION:
            raise WorkbenchError(f"{path} is cache format version {version}, newer than this workbench reads "
                                 f"({FORMAT_VERSION}); upgrade the workbench")
        problem = _manifest_problem(data)
        if problem is not None:
            raise WorkbenchError(f"{path} is not a usable cache manifest ({problem}): it was edited or damaged; "
                                 f"{_manifest_fix(root)}")
        return manifest

    @classmethod
    def create(cls, root: Path, fingerprint: str, recipe: dict, layers: list[int], num_model_layers: int,
               d_model: int, store_dtype: str, model_dtype: str, bos_token_id: int | None,
               pad_token_id: int | None, requested_rows: int, buffer: dict | None = None) -> Manifest:
        """Write the manifest of a new, incomplete cache. recipe: the recipe sections that determine the
        cache's contents (model, data, collect), whose fingerprint is `fingerprint`. buffer: a bounded cache's
        settings (max_shards_on_disk, holdout_shards; see buffer.py), None for a cache that keeps every shard."""
        manifest = cls(root, {
            "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint, "recipe": recipe,
            "layers": layers, "num_model_layers": num_model_layers, "d_model": d_model, "store_dtype": store_dtype,
            "model_dtype": model_dtype, "chunk_rows": chunk_rows(d_model, store_dtype), "bos_token_id": bos_token_id,
            "pad_token_id": pad_token_id, "requested_rows": requested_rows,
            "requested_tokens": requested_rows * recipe["data"]["context_length"], "complete": False}
            | ({"buffer": buffer} if buffer is not None else {}))
        manifest.write()
        return manifest

    def write(self) -> None:
        write_json(self.path, self.data, resume="re-run the same command to resume (completed shards are kept)")

    def reopen(self) -> Manifest:
        """Write this complete cache's manifest back as incomplete, without its shards and summary, so that
        collection redoes the shards it is missing."""
        manifest = Manifest(self.root, {k: v for k, v in self.data.items() if k not in ("shards", "summary")}
                            | {"complete": False})
        manifest.write()
        return manifest

    def finalise(self, num_shards: int, done_before: set[int]) -> Summary:
        """Check every shard is there and complete, then mark the cache complete with its shards and summary.
        done_before: the shards that were complete before this run (for this run's speed). In a bounded cache
        (buffer.py) a shard that training released is taken from the manifest's record of it."""
        gone = {int(k): v for k, v in (self.data.get("released") or {}).items()}
        summary = Summary(shards=num_shards, requested_rows=int(self.data["requested_rows"]),
                          context_length=int(self.data["recipe"]["data"]["context_length"]))
        shards = []
        for index in range(num_shards):
            path = self.root / shard_name(index)
            if index in gone:
                entry = gone[index]
                shards.append({key: entry[key] for key in ("file", "num_tokens", "num_batches", "first_batch", "bytes")})
                summary.bytes += entry["bytes"]
                self._add_stats(summary, json.loads(entry["stats"]), index not in done_before)
                continue
            if not shard_is_complete(path):
                raise WorkbenchError(f"shard {path} is missing after collection; re-run the same command to redo it")
            size = path.stat().st_size
            try:
                with h5py.File(path, "r") as h5:
                    stats = json.loads(h5.attrs["stats"])
                    shards.append({"file": shard_name(index), "num_tokens": int(h5.attrs["num_tokens"]),
                                   "num_batches": int(h5.attrs["num_batches"]),
                                   "first_batch": int(h5.attrs["first_batch"]), "bytes": size})
            except (OSError, KeyError, ValueError) as err:  # json's error is a ValueError
                raise WorkbenchError(f"cannot read shard {path} ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                                     "delete it and re-run the same command to redo it") from None
            summary.bytes += size
            self._add_stats(summary, stats, index not in done_before)
        self.data.update(complete=True, shards=shards, summary=summary.as_dict())
        self.write()
        return summary

    @staticmethod
    def _add_stats(summary: Summary, stats: dict, this_run: bool) -> None:
        summary.tokens += stats["tokens"]
        summary.sequences += stats["sequences"]
        if this_run:
            summary.tokens_this_run += stats["tokens"]
        for layer, s in stats["layers"].items():
            summary.layers.setdefault(int(layer), LayerStats()).add(s)

    def summary(self) -> Summary:
        """The summary a complete cache's manifest records."""
        s = self.data["summary"]
        return Summary(tokens=s["tokens"], sequences=s["sequences"], shards=s["shards"], bytes=s["bytes"],
                       layers={layer: LayerStats(*(s["layers"][str(layer)][k] for k in LAYER_COUNTS))
                               for layer in self.data["layers"]},
                       requested_rows=int(self.data.get("requested_rows", 0)),
                       context_length=int(self.data["recipe"]["data"]["context_length"]))

    def shard_expectations(self, index: int) -> dict:
        """What the manifest says shard `index` holds, as `shard_problems` compares it."""
        m = self.data
        return {"layers": list(m["layers"]), "d_model": m["d_model"], "store_dtype": m["store_dtype"],
                "num_tokens": m["shards"][index]["num_tokens"]}

    def mismatch(self, shard: Path, what: str) -> WorkbenchError:
        """A shard that is whole but disagrees with the manifest: the manifest is what changed."""
        return WorkbenchError(f"{self.path} does not match {shard} ({what}): the manifest was edited or comes "
                              f"from another cache; {_manifest_fix(self.root)}")


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
        if not isinstance(counts, dict) or not all(_COUNT[0](counts.get(k)) for k in LAYER_COUNTS):
            return f"summary.layers has no counts for layer {layer}, which layers lists"
    return None


def shard_is_complete(path: Path, size: int | None = None) -> bool:
    """A shard counts only under its final name, readable, with complete=True (and the recorded size)."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False))
    except OSError:
        return False


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
        shapes |= {f"layer_{layer}/{name}": (n,) for name in LAYER_FIELDS}
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
