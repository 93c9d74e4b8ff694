"""Peak memory and time of converting a large SAE, next to a plain file copy.

    .venv/bin/python bench/convert_bench.py [--dict-size 65536] [--d-model 4096] [--dir /tmp/convert_bench]

Writes a random fp32 BatchTopKSAE (dictionary_learning ae.pt, about 2 GiB at the default size), then in
fresh processes: converts it to SAELens, converts that back to dictionary_learning, and copies ae.pt with
shutil.copyfile. Each process reports its own peak resident set (ru_maxrss: anonymous memory plus the
pages of memory-mapped files it touched). Prints a table and a JSON line; the target is a peak below
1.5x the checkpoint size. The round trip is checked to give back the same tensors. Writes
bench/results/convert_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from workbench.formats.convert import convert
import shutil
mode, src, dst = sys.argv[1:4]
t1 = time.perf_counter()
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if mode == "copy":
    shutil.copyfile(src, dst)
else:
    convert(src, mode, dst)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_after_imports": rss_imports}))
"""

MAKE = r"""
import sys, torch
F, D, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
state = {"b_dec": torch.randn(D, generator=g), "k": torch.tensor(64, dtype=torch.int32),
         "threshold": torch.tensor(0.5), "decoder.weight": torch.randn(D, F, generator=g),
         "encoder.weight": torch.randn(F, D, generator=g), "encoder.bias": torch.randn(F, generator=g)}
torch.save(state, path)
"""

SAME = r"""
import sys, torch
a = torch.load(sys.argv[1], mmap=True, weights_only=True)
b = torch.load(sys.argv[2], mmap=True, weights_only=True)
ok = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
print("same" if ok else "DIFFERENT")
"""


def run(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return (proc.stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dict-size", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--dir", default="/tmp/convert_bench")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "dl").mkdir(parents=True)
    config = {"trainer": {"trainer_class": "BatchTopKTrainer", "dict_class": "BatchTopKSAE", "activation_dim": args.d_model,
                          "dict_size": args.dict_size, "k": 64, "layer": 18, "lm_name": "Qwen/Qwen3-8B"},
              "buffer": {"d_submodule": args.d_model, "io": "out", "ctx_len": 2048}}
    (root / "dl" / "config.json").write_text(json.dumps(config, indent=4))
    run(MAKE, str(args.dict_size), str(args.d_model), str(root / "dl" / "ae.pt"))
    size = (root / "dl" / "ae.pt").stat().st_size
    results = {
        "dl->saelens": json.loads(run(CHILD, "saelens", str(root / "dl"), str(root / "sl"))),
        "saelens->dl": json.loads(run(CHILD, "dictionary_learning", str(root / "sl"), str(root / "rt"))),
        "file copy": json.loads(run(CHILD, "copy", str(root / "dl" / "ae.pt"), str(root / "copy.pt"))),
    }
    same = run(SAME, str(root / "dl" / "ae.pt"), str(root / "rt" / "ae.pt"))
    gib = 1 << 30
    print(f"checkpoint {args.dict_size} x {args.d_model} fp32: {size / gib:.2f} GiB; round trip gives the {same} tensors")
    print(f"{'':<14}{'seconds':>9}{'peak RSS GiB':>14}{'/ checkpoint':>14}{'RSS after imports':>19}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>9.2f}{r['peak_rss'] / gib:>14.2f}{r['peak_rss'] / size:>14.2f}"
              f"{r['rss_after_imports'] / gib:>17.2f} G")
    summary = {"checkpoint_bytes": size, "round_trip": same, **results}
    print(json.dumps(summary))
    out = Path(__file__).resolve().parent / "results" / "convert_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
