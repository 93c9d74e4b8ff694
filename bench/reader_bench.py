"""Shuffled reader throughput against a plain sequential read of the same cache.

    .venv/bin/python bench/reader_bench.py [--mib 512] [--rounds 3]

Two caches of about --mib MiB of activations each are written with the collection's own shard writer
(random activations, 1% of tokens marked dropped): d_model 512 float32 (the bench model) and d_model
4096 bfloat16 (Qwen3-8B's width as the Qwen3 series stores it). Each round, in alternating order:
  sequential  plain h5py: every shard's activations in 4096-row slices, as float32 torch tensors
  shuffled    ActivationCache.batches(layer, 4096, shuffle=True): one full pass, float32 torch batches
  in order    ActivationCache.batches(layer, 4096, shuffle=False)
The files are in the page cache (just written), as for a cache read many times while training; one
ActivationCache serves all passes, as in a training run (its first pass also maps the window's pages,
reported separately). Figures are the median and the best of the rounds: this machine is shared, and
the best is the least disturbed. Peak memory: tracemalloc peak of one shuffled pass (the window) and
this process's ru_maxrss.
Writes bench/results/reader_bench.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench.cache import ActivationCache, Manifest, ShardWriter, chunk_rows, from_stored, to_stored  # noqa: E402
from workbench.sink import DEFAULT_SINK_MULTIPLE, SINK  # noqa: E402

ROWS_PER_BATCH = 2048  # one synthetic forward batch
BATCHES_PER_SHARD = 16
BATCH = 4096  # rows a read


def write_cache(root: Path, d_model: int, store_dtype: str, num_tokens: int) -> None:
    """A cache in the collection's format, written by its ShardWriter, with random activations."""
    rng = np.random.default_rng(0)
    num_batches = num_tokens // ROWS_PER_BATCH
    root.mkdir(parents=True)
    recipe = {"model": {"name": "synthetic"}, "data": {"path": "synthetic", "context_length": ROWS_PER_BATCH, "packing": True},
              "collect": {"drop_first_token": True, "sink_multiple": DEFAULT_SINK_MULTIPLE, "sink_median": "real"}}
    manifest = Manifest.create(root, "synthetic", recipe, [0], 1, d_model, store_dtype, store_dtype, None, None,
                               num_batches)
    acts = torch.randn(ROWS_PER_BATCH, d_model)
    for shard in range(-(-num_batches // BATCHES_PER_SHARD)):
        first = shard * BATCHES_PER_SHARD
        writer = ShardWriter(root, shard, first, [0], d_model, store_dtype)
        kept = 0
        for b in range(first, min(first + BATCHES_PER_SHARD, num_batches)):
            reason = (rng.random(ROWS_PER_BATCH) < 0.01).astype(np.uint8) * SINK
            tokens = {"token_id": np.zeros(ROWS_PER_BATCH, np.int32), "sequence": np.full(ROWS_PER_BATCH, b, np.int64),
                      "position": np.arange(ROWS_PER_BATCH, dtype=np.int32), "batch": np.full(ROWS_PER_BATCH, b, np.int32)}
            layer = {"activations": to_stored(acts.roll(b, 0), store_dtype), "norm": np.ones(ROWS_PER_BATCH, np.float32),
                     "drop_reason": reason, "batch_median": 1.0}
            writer.append(tokens, {0: layer})
            kept += int((reason == 0).sum())
        stats = {"tokens": writer.num_tokens, "sequences": writer.num_batches,
                 "layers": {"0": {"kept": kept, "first_token": 0, "sink": writer.num_tokens - kept}}}
        writer.finish(stats)
    manifest.finalise(-(-num_batches // BATCHES_PER_SHARD), set())


def read_sequential(root: Path, store_dtype: str) -> int:
    n = 0
    for path in sorted((root / "shards").glob("*.h5")):
        with h5py.File(path, "r") as h5:
            ds = h5["layer_0/activations"]
            for start in range(0, ds.shape[0], BATCH):
                n += len(torch.from_numpy(from_stored(ds[start:start + BATCH], store_dtype)))
    return n


def read_batches(cache: ActivationCache, shuffle: bool, seed: int = 0) -> int:
    return sum(len(b) for b in cache.batches(0, BATCH, shuffle=shuffle, seed=seed, drop_last=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="activation bytes per cache")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reader_bench_"))
    results = []
    print(f"reader benchmark: {args.mib} MiB of activations per cache, page cache warm, {args.rounds} rounds, "
          "batch 4096, default window (256 MiB)")
    print(f"{'cache':<22} {'rows':>9} {'chunk rows':>10} {'sequential':>13} {'shuffled':>13} {'in order':>13} "
          f"{'shuffled/seq':>13}")
    for d_model, dtype in ((512, "float32"), (4096, "bfloat16")):
        itemsize = 4 if dtype == "float32" else 2
        num_tokens = (args.mib << 20) // (d_model * itemsize) // ROWS_PER_BATCH * ROWS_PER_BATCH
        root = tmp / f"d{d_model}_{dtype}"
        start = time.perf_counter()
        write_cache(root, d_model, dtype, num_tokens)
        write_s = time.perf_counter() - start
        cache = ActivationCache(root)
        kept = cache.num_tokens(0)
        t = time.perf_counter()
        read_batches(cache, True, seed=99)  # the first pass: opens the shards, maps the window's pages
        first_pass = time.perf_counter() - t
        times: dict[str, list[float]] = {"sequential": [], "shuffled": [], "in order": []}
        runs = {"sequential": lambda r=root, t=dtype: read_sequential(r, t),
                "shuffled": lambda c=cache: read_batches(c, True), "in order": lambda c=cache: read_batches(c, False)}
        for rnd in range(args.rounds):
            for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                rows = runs[name]()
                times[name].append(time.perf_counter() - t)
                assert rows == (num_tokens if name == "sequential" else kept)
        cache.close()
        tracemalloc.start()
        with ActivationCache(root) as fresh:
            read_batches(fresh, True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        median = {k: num_tokens / float(np.median(v)) for k, v in times.items()}
        best = {k: num_tokens / min(v) for k, v in times.items()}
        row = {"d_model": d_model, "store_dtype": dtype, "rows": num_tokens, "kept_rows": kept,
               "chunk_rows": chunk_rows(d_model, dtype), "write_seconds": write_s, "seconds": times,
               "first_shuffled_pass_seconds": first_pass, "rows_per_s_median": median, "rows_per_s_best": best,
               "shuffled_vs_sequential_median": median["shuffled"] / median["sequential"],
               "shuffled_vs_sequential_best": best["shuffled"] / best["sequential"],
               "tracemalloc_peak_mib_shuffled_pass": peak / 2**20}
        results.append(row)
        for label, rate in (("median", median), ("best", best)):
            gbs = {k: v * d_model * 4 / 1e9 for k, v in rate.items()}  # float32 bytes delivered
            print(f"{f'd{d_model} {dtype} {label}':<22} {num_tokens:>9,} {row['chunk_rows']:>10} "
                  f"{rate['sequential']:>9,.0f} r/s {rate['shuffled']:>9,.0f} r/s {rate['in order']:>9,.0f} r/s "
                  f"{rate['shuffled'] / rate['sequential']:>13.2f}   "
                  f"({gbs['sequential']:.2f} / {gbs['shuffled']:.2f} / {gbs['in order']:.2f} GB/s float32)")
        print(f"{'':<22} first shuffled pass {num_tokens / first_pass:,.0f} r/s (maps the window); "
              f"tracemalloc peak {peak / 2**20:,.0f} MiB; written in {write_s:.1f} s")
        shutil.rmtree(root)
    shutil.rmtree(tmp, ignore_errors=True)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"target shuffled/sequential >= 0.5; this process ru_maxrss {maxrss:,.0f} MiB")
    out = REPO / "bench" / "results" / "reader_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mib": args.mib, "rounds": args.rounds, "caches": results, "ru_maxrss_mib": maxrss}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
