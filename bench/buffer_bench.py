"""The cache as a bounded buffer on the demo model: the disk high-water mark of a streaming run against its
bound, the streaming pipeline's wall time against collect-then-train on the same work, and the cost of a
streaming resume at 10% and at 90% of a 1000-step run.

    .venv/bin/python bench/buffer_bench.py [--shards 64] [--max-shards 16] [--rounds 1] [--resume-steps 1000]

The work: recipes/demo-stream.yaml (the embedded tiny model, layers 2 and 3, three SAEs a layer), with
--shards shards of 4,096 tokens. Streaming: `workbench collect` and `workbench train` started together, with
collect.max_shards_on_disk = --max-shards; a thread polls the cache folder's size (every file under it) every
20 ms and keeps the maximum. Collect-then-train: the same two commands one after the other with a buffer
large enough for every shard (the same recipe otherwise, so the trained SAEs are bit-identical, which is
checked). The bound: (max_shards_on_disk + 1 collecting process + holdout_shards) x the largest shard, plus
the manifest and the small files. On these 2-core machines both sides of the streaming run share the
cores, so the wall-time ratio shows the overhead of streaming on one machine, not the overlap that
separate devices give (explained in the README).

Resume: one SAE on layer 2, --resume-steps steps of 96 tokens from a 32-shard buffer (one pass), a checkpoint
every tenth. A streaming pair is killed (SIGKILL, trainer then collector) once the checkpoint at 10%, and in a
second run at 90%, is on disk, and the buffer and run folders are copied. Each round restores a copy and
times a restarted `workbench train` from its start to its first logged step after the checkpoint (Python's
start and imports included), and, in this process, the stream alone: from the checkpoint's positions to the
first batch. Writes bench/results/buffer_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from resume_bench import time_to_first_step, wait_for_checkpoint  # noqa: E402  (the kill point and the restart timing)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_PROGRESS_EVERY": "3600"}
SHARD_TOKENS = 2 * 16 * 128  # demo-stream: 2 forward batches of 16 rows of 128 tokens


def write_recipe(root: Path, shards: int, max_shards: int) -> Path:
    tokens = shards * SHARD_TOKENS
    recipe = {"base": str(REPO / "recipes" / "demo-stream.yaml"), "data": {"num_tokens": tokens},
              "collect": {"max_shards_on_disk": max_shards, "out": str(root / "cache")},
              "train": {"num_tokens": int(0.8 * (shards - 1) * SHARD_TOKENS) // 512 * 512, "out": str(root / "saes")}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # deleted while walking
                pass
    return total


class HighWater(threading.Thread):
    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.peak, self.largest_shard, self.stop = root, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.root.is_dir():
                self.peak = max(self.peak, folder_bytes(self.root))
                for path in (self.root / "shards").glob("shard_*.h5"):
                    try:
                        self.largest_shard = max(self.largest_shard, path.stat().st_size)
                    except FileNotFoundError:
                        pass
            time.sleep(0.02)


def start(which: str, recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench", which, str(recipe)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err[-2000:])


def run(root: Path, shards: int, max_shards: int, streaming: bool) -> dict:
    root.mkdir(parents=True)
    recipe = write_recipe(root, shards, max_shards)
    watch = HighWater(root / "cache")
    watch.start()
    begin = time.perf_counter()
    if streaming:
        collector, trainer = start("collect", recipe), start("train", recipe)
        wait(collector), wait(trainer)
    else:
        wait(start("collect", recipe))
        wait(start("train", recipe))
    seconds = time.perf_counter() - begin
    watch.stop.set()
    watch.join()
    return {"seconds": seconds, "peak_bytes": watch.peak, "largest_shard": watch.largest_shard}


def weights(root: Path) -> dict:
    return torch.load(root / "saes" / "resid_post_layer_2" / "trainer_0" / "ae.pt", weights_only=True)


RESUME_BATCH = 96


def write_resume_recipe(root: Path, steps: int) -> Path:
    recipe = {"base": str(REPO / "recipes" / "demo-stream.yaml"),
              "collect": {"layers": [2], "out": str(root / "cache")},
              "train": {"layers": [2], "saes": [{"name": "sae", "arch": "batchtopk", "width": 512, "k": 16}],
                        "batch_size": RESUME_BATCH, "num_tokens": RESUME_BATCH * steps, "checkpoint_every": steps // 10,
                        "out": str(root / "saes")}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def killed_at(root: Path, steps: int, step: int) -> None:
    """A streaming run killed once the checkpoint of `step` is on disk: the trainer, then the collector."""
    recipe = write_resume_recipe(root, steps)
    checkpoint = root / "saes" / "resid_post_layer_2" / "checkpoint.pt"
    collector, trainer = start("collect", recipe), start("train", recipe)
    wait_for_checkpoint(trainer, checkpoint, step)
    for proc in (trainer, collector):
        proc.kill()
        proc.wait()


def restart_seconds(root: Path, steps: int, step: int) -> float:
    metrics = root / "saes" / "resid_post_layer_2" / "sae" / "metrics.jsonl"
    return time_to_first_step(write_resume_recipe(root, steps), metrics, step)


def stream_seconds(root: Path, steps: int) -> float:
    """The stream alone: from the checkpoint's read position to the first batch after it."""
    from workbench.config import load_recipe
    from workbench.training.buffered import _spec
    from workbench.training.stream import stream

    recipe = load_recipe(write_resume_recipe(root, steps))
    state = torch.load(root / "saes" / "resid_post_layer_2" / "checkpoint.pt", weights_only=True)
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    spec = _spec(recipe, root / "cache", manifest, list(range(recipe.train.data_lanes)))
    begin = time.perf_counter()
    items = stream(spec, [2], {2: state["step"]}, {2: state["reader"]["stream"]})
    next(item for item in items if isinstance(item, tuple))
    seconds = time.perf_counter() - begin
    items.close()
    return seconds


def resume(tmp: Path, steps: int, rounds: int) -> dict:
    import shutil

    kills = [steps // 10, steps * 9 // 10]
    for step in kills:
        root = tmp / f"killed_{step}"
        root.mkdir()
        killed_at(root, steps, step)
    restart = {step: [] for step in kills}
    reader = {step: [] for step in kills}
    for r in range(rounds):
        for step in kills if r % 2 == 0 else kills[::-1]:
            root = tmp / "resumed"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(tmp / f"killed_{step}", root)
            torch.set_num_threads(1)
            reader[step].append(stream_seconds(root, steps))
            restart[step].append(restart_seconds(root, steps, step))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"steps": steps, "kills": kills, "restart_seconds": {str(k): v for k, v in restart.items()},
            "stream_seconds": {str(k): v for k, v in reader.items()},
            "restart_median": {str(k): med(v) for k, v in restart.items()},
            "stream_median": {str(k): med(v) for k, v in reader.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--max-shards", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--resume-steps", type=int, default=1000)
    ap.add_argument("--resume-rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            for streaming in order:
                root = Path(tmp) / f"{'stream' if streaming else 'full'}_{r}"
                result = run(root, args.shards, args.max_shards if streaming else args.shards + 1, streaming)
                rows.append({"streaming": streaming, "round": r, **result})
            same = all(torch.equal(weights(Path(tmp) / f"stream_{r}")[k], weights(Path(tmp) / f"full_{r}")[k])
                       for k in weights(Path(tmp) / f"full_{r}"))
            rows[-1]["same_weights"] = rows[-2]["same_weights"] = same
        resumed = resume(Path(tmp), args.resume_steps, args.resume_rounds)
    stream = [row for row in rows if row["streaming"]]
    full = [row for row in rows if not row["streaming"]]
    shard = max(row["largest_shard"] for row in rows)
    bound = (args.max_shards + 1 + 1) * shard
    peak = max(row["peak_bytes"] for row in stream)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {
        "shards": args.shards, "max_shards_on_disk": args.max_shards, "largest_shard_bytes": shard,
        "bound_bytes": bound, "streaming_peak_bytes": peak, "full_cache_peak_bytes": max(row["peak_bytes"] for row in full),
        "streaming_seconds": med([row["seconds"] for row in stream]), "collect_then_train_seconds": med([row["seconds"] for row in full]),
        "same_weights": all(row["same_weights"] for row in rows), "rows": rows, "resume": resumed,
    }
    print(f"{'':<34}{'streaming':>14}{'collect, then train':>22}")
    print(f"{'cache folder, peak (MB)':<34}{peak / 1e6:>14.2f}{result['full_cache_peak_bytes'] / 1e6:>22.2f}")
    print(f"{'bound (M + 1 + 1 held out) x shard':<34}{bound / 1e6:>14.2f}")
    print(f"{'wall time (s)':<34}{result['streaming_seconds']:>14.1f}{result['collect_then_train_seconds']:>22.1f}")
    print(f"streaming / collect-then-train wall time: {result['streaming_seconds'] / result['collect_then_train_seconds']:.2f}; "
          f"peak within the bound: {peak <= bound}; the same SAE weights: {result['same_weights']}")
    k10, k90 = (str(k) for k in resumed["kills"])
    print(f"streaming resume of a {args.resume_steps}-step run (median of {args.resume_rounds}), seconds: "
          f"restart to first new step {resumed['restart_median'][k10]:.2f} at 10%, {resumed['restart_median'][k90]:.2f} at 90% "
          f"(ratio {resumed['restart_median'][k90] / resumed['restart_median'][k10]:.2f}); the stream's first batch "
          f"{resumed['stream_median'][k10]:.3f} and {resumed['stream_median'][k90]:.3f} "
          f"(ratio {resumed['stream_median'][k90] / resumed['stream_median'][k10]:.2f})")
    out = REPO / "bench" / "results" / "buffer_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
