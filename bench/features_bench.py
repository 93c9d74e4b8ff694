"""The features pass against a plain encode pass over the same cache tokens, and its peak memory.

    .venv/bin/python bench/features_bench.py [--tokens 131072] [--rounds 3] [--threads 1]

A cache is written with the collection's own shard writer: d_model 512 float32 (the bench model's width),
--tokens tokens in rows of 2048 (the first token of each row dropped as a first token, 1% of the others
planted as sinks with 30x the norm), the model recorded as embedded:tiny-qwen3 so that its tokenizer
decodes the (random) token ids. The SAE is a BatchTopK SAE of 4096 latents, random, with its JumpReLU
threshold set so that about 32 latents fire per token. Each round, in alternating order:

  plain     `sae.encode` over every token the features pass reads (kept and sinks), the same reader
  features  `feature_pass`: the same encode plus counts, sums, histograms, the top 20 and the sink report

Figures are the median and best of the rounds (this machine is shared; the best is the least disturbed).
Peak memory: each pass once more in a fresh process, its peak RSS growth over the RSS before it
(Linux: VmHWM after a reset), against the layer's size on disk. The whole command (pass, contexts, features.json, 4097 pages) is timed once.
Writes bench/results/features_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench.cache import ActivationCache, Manifest, ShardWriter, to_stored  # noqa: E402
from workbench.features import build_features  # noqa: E402
from workbench.features.compute import all_but_first_tokens, batch_rows, feature_pass  # noqa: E402
from workbench.formats import dictionary_learning as dl  # noqa: E402
from workbench.sae import BatchTopKSAE  # noqa: E402
from workbench.sink import DEFAULT_SINK_MULTIPLE, FIRST_TOKEN, SINK  # noqa: E402

D, F, K, TOP = 512, 4096, 32, 20
ROWS = 2048  # tokens a row, one row a forward batch
BATCHES_PER_SHARD = 16
MODEL = "embedded:tiny-qwen3"


def write_cache(root: Path, num_tokens: int) -> None:
    """A float32 cache of d_model D in the collection's format, with first tokens and planted sinks."""
    rng = np.random.default_rng(0)
    num_batches = num_tokens // ROWS
    recipe = {"model": {"name": MODEL}, "data": {"path": "synthetic", "context_length": ROWS, "packing": True},
              "collect": {"drop_first_token": True, "sink_multiple": DEFAULT_SINK_MULTIPLE, "sink_median": "real"}}
    root.mkdir(parents=True)
    manifest = Manifest.create(root, "synthetic", recipe, [0], 1, D, "float32", "float32", None, 0, num_batches)
    for shard in range(-(-num_batches // BATCHES_PER_SHARD)):
        first = shard * BATCHES_PER_SHARD
        writer = ShardWriter(root, shard, first, [0], D, "float32")
        counts = {"kept": 0, "first_token": 0, "sink": 0}
        for b in range(first, min(first + BATCHES_PER_SHARD, num_batches)):
            acts = torch.from_numpy(rng.standard_normal((ROWS, D), dtype=np.float32))
            reason = np.where(rng.random(ROWS) < 0.01, SINK, 0).astype(np.uint8)
            reason[0] = FIRST_TOKEN
            acts[torch.from_numpy(reason == SINK)] *= 30
            norms = acts.norm(dim=1).numpy()
            tokens = {"token_id": rng.integers(3, 1000, ROWS).astype(np.int32), "sequence": np.full(ROWS, b, np.int64),
                      "position": np.arange(ROWS, dtype=np.int32), "batch": np.full(ROWS, b, np.int32)}
            writer.append(tokens, {0: {"activations": to_stored(acts, "float32"), "norm": norms, "drop_reason": reason,
                                       "batch_median": float(np.median(norms))}})
            for name, code in (("kept", 0), ("first_token", FIRST_TOKEN), ("sink", SINK)):
                counts[name] += int((reason == code).sum())
        writer.finish({"tokens": writer.num_tokens, "sequences": writer.num_batches, "layers": {"0": counts}})
    manifest.finalise(-(-num_batches // BATCHES_PER_SHARD), set())


def write_sae(folder: Path, cache: ActivationCache) -> None:
    """A random BatchTopK SAE whose JumpReLU threshold makes about K latents fire per token."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D, F, K)
    x = next(iter(cache.batches(0, 4096, seed=0)))
    with torch.no_grad():
        pre = sae.pre_acts(x).flatten()
        sae.threshold.fill_(float(pre.kthvalue(pre.numel() - K * x.shape[0]).values))
    trainer = dl.trainer_section(sae, lr=1e-3, steps=1, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                 threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=0, lm_name=MODEL)
    dl.save_folder(sae, folder, {"trainer": trainer, "buffer": dl.buffer_section(D, ROWS, 1, 1, 4096, "cpu"),
                                 "workbench": {"cache": str(cache.root), "sink_multiple": DEFAULT_SINK_MULTIPLE}})


@torch.no_grad()
def plain_pass(sae: torch.nn.Module, cache: ActivationCache) -> int:
    n = 0
    for x_BD in all_but_first_tokens(cache, 0, batch_rows(F)):
        n += sae.encode(x_BD).shape[0]
    return n


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(kind: str, cache_path: Path, sae_path: Path) -> None:
    """One pass in this fresh process; prints its peak RSS growth over the RSS before it (MiB) as JSON.
    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the imports' and the
    loading's own peaks do not hide the pass's."""
    sae, _ = dl.load_folder(sae_path)
    with ActivationCache(cache_path) as cache:
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_kib("VmRSS")
        plain_pass(sae, cache) if kind == "plain" else feature_pass(sae, cache, 0, None, TOP, F)
        peak = rss_kib("VmHWM")
    print(json.dumps({"before_mib": before / 1024, "growth_mib": (peak - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("plain", "features"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.cache, args.sae)
        return
    tmp = Path(tempfile.mkdtemp(prefix="features_bench_"))
    try:
        cache_path, sae_path = tmp / "cache", tmp / "sae"
        write_cache(cache_path, args.tokens)
        layer_mib = args.tokens * D * 4 / 2**20
        with ActivationCache(cache_path) as cache:
            write_sae(sae_path, cache)
            sae, _ = dl.load_folder(sae_path)
            read = plain_pass(sae, cache)  # warm: opens the shards, fills the page cache
            times: dict[str, list[float]] = {"plain": [], "features": []}
            runs = {"plain": lambda: plain_pass(sae, cache), "features": lambda: feature_pass(sae, cache, 0, None, TOP, F)}
            for rnd in range(args.rounds):
                for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
                    t = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - t)
            stats = feature_pass(sae, cache, 0, None, TOP, F)
        memory = {}
        for kind in ("plain", "features"):
            proc = subprocess.run([sys.executable, __file__, "--child", kind, "--cache", str(cache_path), "--sae",
                                   str(sae_path), "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            memory[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        t = time.perf_counter()
        build_features(sae_path, tmp / "pages", top=TOP)
        command_s = time.perf_counter() - t
        l0 = float(stats.fires_F.sum()) / stats.kept_tokens
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    result = {
        "tokens": args.tokens, "tokens_read": read, "d_model": D, "width": F, "top": TOP, "threads": args.threads,
        "rounds": args.rounds, "mean_l0_kept": l0, "seconds": times,
        "ratio_median": median["features"] / median["plain"], "ratio_best": best["features"] / best["plain"],
        "layer_mib": layer_mib, "peak_growth_mib": {k: v["growth_mib"] for k, v in memory.items()},
        "command_seconds": command_s,
    }
    print(f"features pass vs plain encode: {read:,} tokens of d_model {D}, SAE width {F} (L0 {l0:.1f}), top {TOP}, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print(f"{'':<10} {'plain':>10} {'features':>10} {'ratio':>7}")
    for label, v in (("median", median), ("best", best)):
        print(f"{label:<10} {v['plain']:>9.2f}s {v['features']:>9.2f}s {v['features'] / v['plain']:>7.2f}")
    print(f"peak memory growth over the pass: plain {memory['plain']['growth_mib']:.0f} MiB, features "
          f"{memory['features']['growth_mib']:.0f} MiB; the layer is {layer_mib:.0f} MiB "
          f"(features / layer {memory['features']['growth_mib'] / layer_mib:.2f})")
    print(f"the whole command (pass, contexts, features.json, {F + 1} pages): {command_s:.1f} s; target ratio <= 1.5")
    out = REPO / "bench" / "results" / "features_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
