"""Resume cost: the time from restarting a killed `workbench train` to its first new step, for a run of
--steps steps killed at 10% and at 90%, with the checkpoint's read positions (the workbench) and without
them (the same checkpoint with its `reader` entry removed: the resume then skips the batches already
trained on by reading them, as the workbench did before read positions).

    .venv/bin/python bench/resume_bench.py [--mib 512] [--steps 1000] [--rounds 3]

The cache: about --mib MiB of random float32 activations, d_model 512, written with the collection's
shard writer (bench/reader_bench.py's `write_cache`), page cache warm. Training: one BatchTopK SAE,
width 1024, k 32, batch 1024, 8 lanes, a checkpoint every tenth of the run, one thread. Each kill point is made
once: the run is killed with SIGKILL as soon as the checkpoint of that step is on disk. Each round then
restarts every variant from a fresh copy of its killed folder, in alternating order, and times the
process from its start to the first metrics.jsonl line after the checkpoint (Python's start and the
imports included: the same in every variant, and on a loaded machine most of the figure), and, in this
process, the reader's part alone: the time `global_batches` takes to give the first batch after the
checkpoint, every lane of the run in one process. Figures: medians of the rounds.
Writes bench/results/resume_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from reader_bench import ROWS_PER_BATCH, write_cache  # noqa: E402

BATCH = 1024


def write_recipe(root: Path, cache: Path, steps: int) -> Path:
    train = {"cache": str(cache), "layers": [0], "saes": [{"name": "sae", "arch": "batchtopk", "width": 1024, "k": 32}],
             "batch_size": BATCH, "num_tokens": BATCH * steps, "warmup_steps": 10, "threshold_start_step": 10,
             "eval_tokens": 4096, "checkpoint_every": steps // 10, "out": str(root / "saes")}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": train}))
    return path


def command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "workbench", "train", str(recipe), "--progress-every", "3600"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_at(recipe: Path, checkpoint: Path, step: int) -> None:
    """Run the training and SIGKILL it once the checkpoint of `step` is on disk."""
    proc = subprocess.Popen(command(recipe), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, checkpoint, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint: Path, step: int) -> None:
    """Return once the training `proc` has the checkpoint of `step` on disk (polled every 5 ms)."""
    while proc.poll() is None:
        if checkpoint.is_file():
            try:
                at = torch.load(checkpoint, weights_only=True)["step"]
            except Exception:  # being replaced
                at = None
            if at == step:
                return
            if at is not None and at > step:
                break
        time.sleep(0.005)
    proc.kill()
    raise SystemExit(f"the run passed step {step} before it could be killed there")


def time_to_first_step(recipe: Path, metrics: Path, after: int) -> float:
    """Seconds from the start of the restarted process to its first logged step after `after`."""
    start = time.perf_counter()
    proc = subprocess.Popen(command(recipe), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            if metrics.is_file():
                lines = [line for line in metrics.read_text().splitlines() if line.strip()]
                try:
                    if lines and json.loads(lines[-1])["step"] > after:
                        return time.perf_counter() - start
                except json.JSONDecodeError:
                    pass  # a line being appended
            time.sleep(0.005)
        raise SystemExit(f"the restarted run ended first: {proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()


def reader_seconds(recipe_path: Path, checkpoint: Path, reread: bool) -> float:
    """Seconds the training loop's reader takes to give the first global batch after the checkpoint."""
    from workbench.config import load_recipe
    from workbench.training.loop import global_batches, layer_plans

    recipe = load_recipe(recipe_path)
    t, plan = recipe.train, layer_plans(recipe)[0]
    state = torch.load(checkpoint, weights_only=True)
    start = time.perf_counter()
    batches = global_batches(Path(t.cache), 0, list(range(t.data_lanes)), t, plan, state["step"],
                             None if reread else state["reader"])
    next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="resume_bench_"))
    cache = tmp / "cache"
    write_cache(cache, 512, "float32", (args.mib << 20) // (512 * 4) // ROWS_PER_BATCH * ROWS_PER_BATCH)
    kills = [args.steps // 10, args.steps * 9 // 10]
    killed = {}
    for step in kills:
        root = tmp / f"killed_{step}"
        root.mkdir()
        recipe = write_recipe(root, cache, args.steps)
        kill_at(recipe, root / "saes" / "resid_post_layer_0" / "checkpoint.pt", step)
        killed[step] = root
    variants = [(step, reread) for step in kills for reread in (False, True)]
    times: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    reader: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for step, reread in (variants if rnd % 2 == 0 else variants[::-1]):
            root = tmp / "run"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(killed[step], root)
            recipe = write_recipe(root, cache, args.steps)
            checkpoint = root / "saes" / "resid_post_layer_0" / "checkpoint.pt"
            torch.set_num_threads(1)
            reader[(step, reread)].append(reader_seconds(recipe, checkpoint, reread))
            if reread:
                state = torch.load(checkpoint, weights_only=True)
                del state["reader"]
                torch.save(state, checkpoint)
            times[(step, reread)].append(time_to_first_step(recipe, root / "saes" / "resid_post_layer_0" / "sae" /
                                                            "metrics.jsonl", step))
    print(f"resume benchmark: {args.mib} MiB cache (d_model 512, float32), {args.steps} steps of {BATCH} tokens, "
          f"{args.rounds} rounds (median), seconds")
    print(f"{'':>26} {'read positions':>15} {'re-read (before)':>17} {'re-read / positions':>20}")
    for label, figures in (("restart to first new step", times), ("reader: first batch", reader)):
        medians = {v: statistics.median(t) for v, t in figures.items()}
        for step in kills:
            print(f"{label + f' @{step}':>26} {medians[(step, False)]:>15.3f} {medians[(step, True)]:>17.3f} "
                  f"{medians[(step, True)] / medians[(step, False)]:>19.2f}x")
        print(f"{label + ' 90%/10%':>26} {medians[(kills[1], False)] / medians[(kills[0], False)]:>15.2f} "
              f"{medians[(kills[1], True)] / medians[(kills[0], True)]:>17.2f}")
    out = REPO / "bench" / "results" / "resume_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"mib": args.mib, "steps": args.steps, "batch": BATCH, "rounds": args.rounds,
                               "restart_seconds": {f"{step}_{'reread' if reread else 'positions'}": t
                                                   for (step, reread), t in times.items()},
                               "reader_seconds": {f"{step}_{'reread' if reread else 'positions'}": t
                                                  for (step, reread), t in reader.items()}}, indent=1))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
