"""Collection throughput against a bare forward loop over the same batches.

    .venv/bin/python bench/collect_bench.py [--rounds 5] [--batches 4] [--threads 1]

On `embedded:bench-qwen3` (Qwen3 architecture, 8 layers, hidden 512; built locally on first use) the same
forward batches (same rows, same batch size) are run, round after round, in alternating order:
  bare      `model(input_ids, attention_mask, use_cache=False)` over pre-tokenized batches, under no_grad
  last      `collect()` of the last layer (7): tokenization, hooks, sink filter, HDF5 writes, manifest
  25%       `collect()` of layer 2 (25% depth): the forward stops after layer 2
`collect()` gets the already-loaded model, so both sides exclude model loading; everything else that
collection does (including creating, fsyncing and finalizing the cache) is timed, as wall time and as
this process's CPU time. With one torch thread (the default here) CPU time is the work done, and it
stays meaningful on a machine shared with other jobs, where wall times swing by 2x. Peak memory: this
process's ru_maxrss, the tracemalloc peak (numpy buffers) of one extra collection, and the RSS of a
separate `workbench collect` process (tiny model) on 16k and 64k tokens (bounded: it should not grow).
Writes bench/results/collect_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench import data as data_mod  # noqa: E402
from workbench.collect import collect  # noqa: E402
from workbench.config import load_recipe  # noqa: E402
from workbench.model import load_model, load_tokenizer  # noqa: E402

MODEL = "embedded:bench-qwen3"


def _recipe(out: Path, layer: int, num_tokens: int, batch_size: int, context: int):
    return load_recipe(None, [f"model.name={MODEL}", "model.dtype=float32", f"data.context_length={context}",
                              f"data.num_tokens={num_tokens}", f"collect.batch_size={batch_size}",
                              f"collect.layers=[{layer}]", "collect.shard_batches=2", f"collect.out={out}"])


def _time_collect(recipe, model, tokenizer) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens stored) of one collection into a fresh directory."""
    shutil.rmtree(recipe.collect.out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        wall, cpu = time.perf_counter(), time.process_time()
        summary = collect(recipe, model=model, tokenizer=tokenizer)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shutil.rmtree(recipe.collect.out, ignore_errors=True)
    return wall, cpu, summary.tokens


def _time_bare(model, batches) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def _subprocess_rss(out: Path, num_tokens: int, env: dict) -> float:
    """Peak RSS (MiB) of a separate `workbench collect` on the tiny model (fast), for memory scaling."""
    shutil.rmtree(out, ignore_errors=True)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    code = ("import sys; from workbench.cli import main; rc = main(sys.argv[1:]); "
            "print('RSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "collect", "recipes/demo.yaml", f"data.num_tokens={num_tokens}",
                           "collect.shard_batches=8", f"collect.out={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return int(proc.stdout.split("RSS")[-1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="forward batches per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    num_tokens = args.batches * args.batch_size * args.context
    tmp = Path(tempfile.mkdtemp(prefix="collect_bench_"))
    base = _recipe(tmp / "x", 7, num_tokens, args.batch_size, args.context)
    tokenizer = load_tokenizer(base.model)
    model = load_model(base.model)
    n_layers = model.config.num_hidden_layers
    last, quarter = n_layers - 1, int(0.25 * n_layers)
    batches = list(data_mod.iter_batches(data_mod.iter_rows(base.data, tokenizer), args.batch_size, tokenizer.pad_token_id))
    tokens = sum(int(b.attention_mask_BL.sum()) for b in batches)
    recipes = {"last": _recipe(tmp / "last", last, num_tokens, args.batch_size, args.context),
               "25%": _recipe(tmp / "q", quarter, num_tokens, args.batch_size, args.context)}

    _time_bare(model, batches[:1])  # warm-up
    _time_collect(recipes["last"], model, tokenizer)
    wall: dict[str, list[float]] = {"bare": [], "last": [], "25%": []}
    cpu: dict[str, list[float]] = {"bare": [], "last": [], "25%": []}
    order = ["bare", "last", "25%"]
    for r in range(args.rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            if mode == "bare":
                w, c = _time_bare(model, batches)
            else:
                w, c, stored = _time_collect(recipes[mode], model, tokenizer)
                assert stored == tokens
            wall[mode].append(w)
            cpu[mode].append(c)

    tracemalloc.start()
    _time_collect(recipes["last"], model, tokenizer)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_EMBEDDED_DIR": os.environ.get("WORKBENCH_EMBEDDED_DIR", str(REPO / "checkpoints/embedded"))}
    rss = {n: _subprocess_rss(tmp / "rss", n, env) for n in (16384, 65536)}
    shutil.rmtree(tmp, ignore_errors=True)

    rate = {m: tokens * args.rounds / sum(t) for m, t in wall.items()}
    cpu_rate = {m: tokens * args.rounds / sum(t) for m, t in cpu.items()}
    result = {
        "model": MODEL, "layers": n_layers, "d_model": model.config.hidden_size, "dtype": "float32",
        "batch_size": args.batch_size, "context_length": args.context, "tokens_per_run": tokens, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "layer_last": last, "layer_25": quarter,
        "wall_seconds": wall, "cpu_seconds": cpu, "tokens_per_wall_s": rate, "tokens_per_cpu_s": cpu_rate,
        "ratio_last_vs_bare_wall": rate["last"] / rate["bare"], "ratio_25_vs_bare_wall": rate["25%"] / rate["bare"],
        "ratio_last_vs_bare_cpu": cpu_rate["last"] / cpu_rate["bare"],
        "ratio_25_vs_bare_cpu": cpu_rate["25%"] / cpu_rate["bare"],
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tracemalloc_peak_mib_one_collect": traced_peak / 2**20,
        "subprocess_rss_mib_tiny_model": {str(k): v for k, v in rss.items()},
    }
    print(f"collection benchmark: {MODEL} ({n_layers} layers, d_model {result['d_model']}, fp32), "
          f"{args.rounds} rounds x {tokens:,} tokens (batch {args.batch_size} x {args.context}), "
          f"{result['threads']} torch threads, order alternating")
    print(f"{'run':<28} {'tokens/s wall':>14} {'vs bare':>8} {'tokens/CPU-s':>13} {'vs bare':>8}")
    for mode, label, target in (("bare", "bare model(**batch)", ""), ("last", f"collect layer {last} (last)", "target >= 0.95"),
                                ("25%", f"collect layer {quarter} (25%)", "target > 1")):
        print(f"{label:<28} {rate[mode]:>14,.0f} {rate[mode] / rate['bare']:>8.3f} {cpu_rate[mode]:>13,.0f} "
              f"{cpu_rate[mode] / cpu_rate['bare']:>8.3f}   {target}")
    print(f"peak memory: this process ru_maxrss {result['ru_maxrss_mib']:,.0f} MiB; tracemalloc peak of one collect "
          f"{result['tracemalloc_peak_mib_one_collect']:,.1f} MiB; a separate `workbench collect` (tiny model) "
          + ", ".join(f"{k:,} tokens {v:,.0f} MiB" for k, v in rss.items()))
    out = REPO / "bench" / "results" / "collect_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
