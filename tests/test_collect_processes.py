"""Two processes under `accelerate launch` (CPU, gloo) write the same cache as one process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
from conftest import accelerate_two_cpu_processes, torch_threads

from workbench.cache import ActivationCache
from workbench.collect import collect
from workbench.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
# 44 rows in 11 batches in 6 shards: rank 0 writes shards 0, 2, 4 and rank 1 shards 1, 3, 5 (one batch).
RECIPE = """
model: {name: "embedded:tiny-qwen3"}
data: {context_length: 64, num_tokens: 2800}
collect: {layers: [1, 3], batch_size: 4, shard_batches: 2}
"""


def _sorted_tokens(cache: ActivationCache, layer: int) -> dict[str, np.ndarray]:
    r = cache.read(layer, include_dropped=True)
    order = np.lexsort((r["position"], r["sequence"]))
    return {k: v[order] for k, v in r.items()}


def test_two_processes_give_the_same_cache_contents_as_one(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    with torch_threads(1):
        collect(load_recipe(recipe, [f"collect.out={tmp_path / 'one'}"]))

    launch, env = accelerate_two_cpu_processes(tmp_path)
    cmd = [*launch, "collect", str(recipe), f"collect.out={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tokens read") == 1  # one summary, from the main process
    # Really two processes: each wrote its own shards (shard i by process i mod 2).
    writers = []
    for shard in sorted((tmp_path / "two" / "shards").glob("shard_*.h5")):
        with h5py.File(shard, "r") as h5:
            writers.append((int(h5.attrs["process_index"]), int(h5.attrs["num_processes"])))
    assert writers == [(i % 2, 2) for i in range(6)]

    with ActivationCache(tmp_path / "one") as one, ActivationCache(tmp_path / "two") as two:
        m1, m2 = one.manifest, two.manifest
        assert len(m1["shards"]) == 6 and m1["summary"]["tokens"] == 44 * 64
        no_bytes = lambda m: {**m, "shards": [{**s, "bytes": 0} for s in m["shards"]],  # noqa: E731
                              "summary": {**m["summary"], "bytes": 0}}
        assert no_bytes(m1) == no_bytes(m2)  # same recipe fingerprint, shards, token and drop counts
        for layer in (1, 3):
            a, b = _sorted_tokens(one, layer), _sorted_tokens(two, layer)
            assert len(a["sequence"]) == 44 * 64 and (a["drop_reason"] == 2).sum() > 0
            for key in ("activations", "token_ids", "sequence", "position", "kept", "drop_reason"):
                assert np.array_equal(a[key], b[key]), (layer, key)
