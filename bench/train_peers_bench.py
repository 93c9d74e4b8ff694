"""Training step against every peer, side by side in one run: the workbench's Trainer.update,
dictionary_learning 0.1.0's update, sae-lens 6.54.12's SAETrainer._train_step and sparsify's TopK step
(PyPI eai-sparsify, per-token top-k: the closest peer step; no Matryoshka), with the floor: the encoder
product (x - b_dec) @ W_enc alone at the same shapes. The workbench's SAELens-algorithm step
(SAELensTrainer with train.saelens.exact false, at the SAELens side's settings) runs beside them, against
SAELens' own step and the floor (the last five columns).

    .venv/bin/python bench/train_peers_bench.py [--steps 20] [--warmup 5] [--rounds 3] [--threads 1]
                                                [--regimes btk-4096,...] [--sparsify-venv DIR]

B 1024 tokens a step, D 256, fp32; the regimes of issue 16's table (bench/train_peers_worker.py says how
latents are made dead): BatchTopK F 4096 / k 32 with no, 10% and every latent dead, F 16384 / k 80 with
none dead; Matryoshka (the Gemma-3 series' fractions 1/32, 1/16, 1/8, 1/4, 17/32) F 4096 / k 32 with no,
10% and every latent dead. Every side starts from the same weights and sees the same batches. The floor
is the encoder product alone, written into one preallocated [B, F] output (a fresh output would add the
page faults of a new allocation, which a step can avoid).

Each side is a process of its own (importing dictionary_learning patches torch; sparsify lives in its
own virtualenv, made by this script on first use: `--sparsify-venv`, default .venv-sparsify, ignored
by git, with the CPU wheel of torch), started once, with the same thread count; the sides wait on
their stdin while another runs. A round times every regime on every side in turn; the table shows
steps/s from the median of the rounds, and the ratios are of those medians; the machine may be shared,
so each side's CPU time (process_time) is recorded too, and the ratios from it are the last two
columns. Writes bench/results/train_peers_bench.json (every round's times too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench.sae.registry import ARCHITECTURES  # noqa: E402

WORKER = REPO / "bench" / "train_peers_worker.py"
B, D = 1024, 256
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32]
REGIMES = {  # name: (architecture, F, k, dead)
    "btk-4096": ("batchtopk", 4096, 32, "none"),
    "btk-4096-dead10": ("batchtopk", 4096, 32, "10"),
    "btk-4096-deadall": ("batchtopk", 4096, 32, "all"),
    "btk-16384": ("batchtopk", 16384, 80, "none"),
    "mat-4096": ("matryoshka", 4096, 32, "none"),
    "mat-4096-dead10": ("matryoshka", 4096, 32, "10"),
    "mat-4096-deadall": ("matryoshka", 4096, 32, "all"),
}
LABELS = {"none": "no dead latents", "10": "10% of latents dead", "all": "every latent dead"}
SIDES = ["floor", "workbench", "dictionary_learning", "saelens", "sparsify", "workbench_saelens"]
PEERS = ["dictionary_learning", "saelens", "sparsify"]
SPARSIFY_PINS = ["torch==2.13.0", "eai-sparsify==1.3.3"]  # the CPU wheel of torch: no CUDA libraries


def make_batches(n: int) -> torch.Tensor:
    """[n, B, D]: sparse non-negative combinations of 1024 directions plus noise (activation-like)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(1024, D, generator=g) / D**0.5
    out = torch.empty(n, B, D)
    for i in range(n):
        out[i] = torch.relu(torch.randn(B, 1024, generator=g) - 2.0) @ directions + 0.05 * torch.randn(B, D, generator=g)
    return out


def write_spec(path: Path, regime: str, batches: torch.Tensor) -> None:
    arch_name, F, k, dead = REGIMES[regime]
    arch = ARCHITECTURES[arch_name]
    torch.manual_seed(0)
    sae = arch.build(D, F, k, FRACTIONS)
    dead_idx = torch.arange(0, F, 10) if dead == "10" else torch.zeros(0, dtype=torch.long)
    if dead == "10":  # below the batch top-k cut of the first batch: they (almost) never fire
        with torch.no_grad():
            pre_BF = sae.hidden_pre(batches[0])
            sae.b_enc_F[dead_idx] -= pre_BF.flatten()[::97].quantile(1 - k / F)
    torch.save({"repo": str(REPO), "D": D, "F": F, "k": k, "grouped": arch.grouped, "fractions": FRACTIONS,
                "dead": dead, "dead_idx": dead_idx, "state": sae.state_dict(), "batches": batches}, path)


def sparsify_python(venv: Path) -> Path:
    """The sparsify virtualenv's python, created on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SPARSIFY_PINS], check=True)
    return python


class Side:
    """A worker process for one side: `time(spec, warmup, steps)` -> (seconds, CPU seconds, dead latents)."""

    def __init__(self, side: str, python: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([str(python), str(WORKER), side, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.proc.args[2]} exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def time(self, spec: Path, warmup: int, steps: int) -> tuple[float, float, int]:
        self.proc.stdin.write(json.dumps({"spec": str(spec), "warmup": warmup, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        return answer["s"], answer["cpu_s"], answer["dead"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps a round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--sparsify-venv", type=Path, default=REPO / ".venv-sparsify")
    args = parser.parse_args()
    regimes = args.regimes.split(",")
    pythons = {side: Path(sys.executable) for side in SIDES}
    pythons["sparsify"] = sparsify_python(args.sparsify_venv)
    times: dict = {r: {s: [] for s in SIDES} for r in regimes}
    cpu_times: dict = {r: {s: [] for s in SIDES} for r in regimes}
    dead: dict = {r: {} for r in regimes}
    with tempfile.TemporaryDirectory() as tmp:
        batches = make_batches(args.warmup + args.steps)
        specs = {r: Path(tmp) / f"{r}.pt" for r in regimes}
        for r in regimes:
            write_spec(specs[r], r, batches)
        workers = {side: Side(side, pythons[side], args.threads) for side in SIDES}
        try:
            for round_ in range(args.rounds):
                for r in regimes:
                    order = SIDES if round_ % 2 == 0 else SIDES[::-1]  # alternate who runs first
                    for side in order:
                        if side == "sparsify" and REGIMES[r][0] == "matryoshka":
                            continue
                        seconds, cpu_seconds, n_dead = workers[side].time(specs[r], args.warmup, args.steps)
                        times[r][side].append(seconds)
                        cpu_times[r][side].append(cpu_seconds)
                        dead[r][side] = n_dead
                    print(f"round {round_ + 1}/{args.rounds} {r}: " + ", ".join(
                        f"{s} {args.steps / t[-1]:.2f}" for s, t in times[r].items() if t), flush=True)
        finally:
            for w in workers.values():
                w.close()

    rows = {}
    for r in regimes:
        med = {s: statistics.median(t) for s, t in times[r].items() if t}
        cpu = {s: statistics.median(t) for s, t in cpu_times[r].items() if t}
        rate = {s: args.steps / m for s, m in med.items()}
        cpu_rate = {s: args.steps / m for s, m in cpu.items()}
        fastest_peer = max((p for p in PEERS if p in rate), key=rate.get)
        fastest_peer_cpu = max((p for p in PEERS if p in cpu_rate), key=cpu_rate.get)
        rows[r] = {"arch": REGIMES[r][0], "F": REGIMES[r][1], "k": REGIMES[r][2], "dead": REGIMES[r][3],
                   "steps_per_s": rate, "dead_latents_last_step": dead[r], "fastest_peer": fastest_peer,
                   "vs_fastest_peer": rate["workbench"] / rate[fastest_peer],
                   "vs_floor": med["workbench"] / med["floor"], "rounds_s": times[r],
                   "cpu_steps_per_s": cpu_rate, "fastest_peer_cpu": fastest_peer_cpu,
                   "vs_fastest_peer_cpu": cpu_rate["workbench"] / cpu_rate[fastest_peer_cpu],
                   "vs_floor_cpu": cpu["workbench"] / cpu["floor"], "rounds_cpu_s": cpu_times[r],
                   # the SAELens-algorithm step (train.saelens.exact false) against SAELens' own and the floor
                   "saelens_algorithm_vs_saelens": rate["workbench_saelens"] / rate["saelens"],
                   "saelens_algorithm_vs_floor": med["workbench_saelens"] / med["floor"],
                   "saelens_algorithm_vs_saelens_cpu": cpu_rate["workbench_saelens"] / cpu_rate["saelens"],
                   "saelens_algorithm_vs_floor_cpu": cpu["workbench_saelens"] / cpu["floor"]}
    results = {"B": B, "D": D, "dtype": "float32", "threads": args.threads, "steps": args.steps,
               "warmup": args.warmup, "rounds": args.rounds, "matryoshka_fractions": FRACTIONS,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "sparsify_pins": SPARSIFY_PINS, "regimes": rows}

    print(f"\nB {B}, D {D}, fp32, {args.threads} thread(s) a side; steps/s (wall clock), median of {args.rounds} "
          f"rounds of {args.steps} steps; the last two columns from each side's CPU time instead")
    header = ["regime", "workbench", "dictionary_learning", "SAELens", "sparsify", "floor (x @ W_enc)",
              "vs fastest peer", "step / floor", "vs fastest peer (CPU)", "step / floor (CPU)",
              "workbench, SAELens' algorithm", "it vs SAELens", "its step / floor", "vs SAELens (CPU)",
              "step / floor (CPU)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows.values():
        rate = row["steps_per_s"]
        name = f"{'BatchTopK' if row['arch'] == 'batchtopk' else 'Matryoshka'} F {row['F']} k {row['k']}, {LABELS[row['dead']]}"
        cells = [name] + [f"{rate[s]:.2f}" if s in rate else "-" for s in ["workbench", *PEERS, "floor"]]
        cells += [f"{row['vs_fastest_peer']:.2f}x ({row['fastest_peer']})", f"{row['vs_floor']:.2f}x",
                  f"{row['vs_fastest_peer_cpu']:.2f}x", f"{row['vs_floor_cpu']:.2f}x", f"{rate['workbench_saelens']:.2f}",
                  f"{row['saelens_algorithm_vs_saelens']:.2f}x", f"{row['saelens_algorithm_vs_floor']:.2f}x",
                  f"{row['saelens_algorithm_vs_saelens_cpu']:.2f}x", f"{row['saelens_algorithm_vs_floor_cpu']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    out = REPO / "bench" / "results" / "train_peers_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
