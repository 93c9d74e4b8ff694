"""`workbench inspect CACHE [--verify]`: what a cache holds and what the sink filter did, shard by shard;
with --verify, every byte of every shard checked against its checksums. It reads through ActivationCache's
public methods only."""

from __future__ import annotations

from collections import Counter

import numpy as np

from workbench.cache.reader import ActivationCache
from workbench.errors import WorkbenchError
from workbench.sink import SINK


def sink_statistics(cache: ActivationCache, layer: int) -> dict:
    """Per layer: sink count, the norm/median ratios of sinks and kept tokens, the commonest sink tokens
    and positions. Reads only the per-token metadata (checked against its checksums), a shard at a time."""
    sink_ids: Counter[int] = Counter()
    sink_pos: Counter[int] = Counter()
    max_kept_ratio, ratios = 0.0, []
    for shard in range(len(cache.shards)):
        g = f"layer_{layer}"
        reason = cache.read_vector(shard, f"{g}/drop_reason")
        batch = cache.read_vector(shard, "tokens/batch") - cache.first_batch(shard)
        ratio = cache.read_vector(shard, f"{g}/norm") / cache.read_vector(shard, f"{g}/batch_median")[batch]
        sink = reason == SINK
        sink_ids.update(cache.read_vector(shard, "tokens/token_id")[sink].tolist())
        sink_pos.update(cache.read_vector(shard, "tokens/position")[sink].tolist())
        ratios.append(ratio[sink])
        if (reason == 0).any():
            max_kept_ratio = max(max_kept_ratio, float(ratio[reason == 0].max()))
    sink_ratio = np.concatenate(ratios) if ratios else np.zeros(0)
    return {"sinks": int(len(sink_ratio)), "sink_ratio_min": float(sink_ratio.min()) if len(sink_ratio) else None,
            "sink_ratio_median": float(np.median(sink_ratio)) if len(sink_ratio) else None,
            "kept_ratio_max": max_kept_ratio, "top_tokens": sink_ids.most_common(), "top_positions": sink_pos.most_common()}


def verify(cache: ActivationCache) -> str:
    """Read every shard whole and check it (ActivationCache.check_shard). Returns the report line; a corrupt
    shard (or a manifest that disagrees with the shards) is one WorkbenchError naming every one."""
    corrupt, unverified = [], 0
    for index, path in enumerate(cache.shards):
        check = cache.check_shard(index)
        if check.damaged:
            corrupt.append(f"{path.name} ({check.damaged})")
        elif not check.verified:
            unverified += 1
    if corrupt:
        raise WorkbenchError(f"cache {cache.root}: {len(corrupt)} of {len(cache.shards)} shards are corrupt: "
                             f"{', '.join(corrupt)}; delete them and re-run the same `workbench collect` command to "
                             "redo them")
    n = len(cache.shards)
    if unverified:
        return (f"{n - unverified} of {n} shards verified; {unverified} have no checksums (written by cache format "
                "version 1) and cannot be verified: collect again to add them")
    return f"all {n} shards verified: every block matches its checksum (xxh3)"


def _checksum_line(cache: ActivationCache) -> str:
    if int(cache.manifest["version"]) < 2:
        return "none (cache format version 1): reads check for NaN/Inf only, --verify cannot verify it"
    return "xxh3 of every block, checked by every read; --verify reads every shard"


def describe(path: str, top: int = 10, check: bool = False) -> str:
    """The report `workbench inspect` prints; check: read and verify every shard first (`--verify`)."""
    with ActivationCache(path) as cache:
        m = cache.manifest
        if "summary" not in m:  # a bounded cache being written: what its held-out shards hold
            s = {"tokens": 0, "sequences": 0, "shards": len(cache.shards), "bytes": sum(cache._shard_bytes),
                 "layers": {str(layer): {"kept": cache.num_tokens(layer), "first_token": 0, "sink": 0} for layer in cache.layers}}
        else:
            s = m["summary"]
        rec = m["recipe"]
        lines = [
            f"cache      {path}",
            f"model      {rec['model']['name']} ({m['num_model_layers']} layers, d_model {cache.d_model}, {m['model_dtype']})",
            f"stored as  {cache.store_dtype}; layers {cache.layers}",
            f"data       {rec['data']['path']} context {rec['data']['context_length']} packing {rec['data']['packing']}",
            f"filter     sink multiple {rec['collect']['sink_multiple']} (median over {rec['collect']['sink_median']} tokens), "
            f"drop first token {rec['collect']['drop_first_token']}",
            f"size       {s['tokens']:,} tokens in {s['sequences']:,} sequences, {s['shards']} shards, {s['bytes'] / 2**20:,.1f} MiB",
            *([f"buffer     bounded (collect.max_shards_on_disk {m['buffer']['max_shards_on_disk']}): "
               f"{len(m.get('released') or {})} shards released and deleted, held-out shards 0..{len(cache.shards) - 1} "
               f"kept{'' if m['complete'] else '; still being collected'}; sink statistics below: the held-out shards"]
              if cache.bounded else []),
            f"checksums  {verify(cache) if check else _checksum_line(cache)}",
            *([f"warning    the data ran out: {s['sequences']:,} of the {m['requested_rows']:,} requested rows were read"]
              if s["sequences"] < m.get("requested_rows", 0) else []),
            "",
            f"{'layer':>6} {'kept':>12} {'first':>9} {'sinks':>9} {'sink %':>8} {'sink/median min..med':>22} {'kept max':>9}",
        ]
        details = []
        for layer in cache.layers:
            ls = s["layers"][str(layer)]
            st = sink_statistics(cache, layer)
            span = "-" if st["sinks"] == 0 else f"{st['sink_ratio_min']:.1f}..{st['sink_ratio_median']:.1f}x"
            lines.append(f"{layer:>6} {ls['kept']:>12,} {ls['first_token']:>9,} {ls['sink']:>9,} "
                         f"{100 * ls['sink'] / max(s['tokens'], 1):>7.3f}% {span:>22} {st['kept_ratio_max']:>8.2f}x")
            if st["top_tokens"]:
                toks = ", ".join(f"{t}:{n}" for t, n in st["top_tokens"][:top])
                pos = ", ".join(f"{p}:{n}" for p, n in st["top_positions"][:top])
                details.append(f"layer {layer} sink token ids (id:count) {toks}; positions {pos}")
        return "\n".join(lines + [""] + details)
