"""Collection: text -> model -> resid_post activations (+ sink filter) -> HDF5 shards, under Accelerate.

Forward batch b is always the same sequences (rows b*batch_size ...), whatever the number of processes,
so the batch medians, the kept set and the cache contents do not depend on it. Batches are grouped into
shards of `collect.shard_batches`; process r of W writes the shards whose index is r mod W. A shard is
written under a `.partial` name and renamed when complete, so re-running the same command after a crash
redoes only the shards that were not finished.

    workbench collect recipes/demo.yaml collect.batch_size=8
    accelerate launch --num_processes 2 -m workbench collect recipes/demo.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench import data as data_mod
from workbench.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    read_manifest,
    shard_is_complete,
    shard_name,
    to_stored,
    write_json_atomic,
)
from workbench.config import Recipe, fingerprint, to_dict
from workbench.errors import WorkbenchError
from workbench.model import (
    capture_resid_post,
    d_model_of,
    decoder_layers,
    load_model,
    load_tokenizer,
    max_context_of,
    resolve_layers,
)
from workbench.sink import FIRST_TOKEN, SINK, first_token_mask, sink_filter


def cache_identity(recipe: Recipe) -> dict:
    """The recipe fields that determine a cache's contents (not where it is written)."""
    collect = to_dict(recipe.collect)
    for key in ("out", "device"):
        collect.pop(key)
    model = to_dict(recipe.model)
    return {"model": model, "data": to_dict(recipe.data), "collect": collect}


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
    tokens: int = 0
    sequences: int = 0
    shards: int = 0
    bytes: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "sequences": self.sequences, "shards": self.shards, "bytes": self.bytes,
                "layers": {str(k): vars(v) for k, v in self.layers.items()}}

    def table(self) -> str:
        lines = [f"tokens read {self.tokens:,} in {self.sequences:,} sequences, {self.shards} shards, "
                 f"{self.bytes / 2**20:,.1f} MiB written",
                 f"{'layer':>6} {'kept':>12} {'first token':>12} {'sinks':>10} {'sink %':>8}"]
        for layer, s in sorted(self.layers.items()):
            pct = 100 * s.sink / max(self.tokens, 1)
            lines.append(f"{layer:>6} {s.kept:>12,} {s.first_token:>12,} {s.sink:>10,} {pct:>7.3f}%")
        return "\n".join(lines)


def _prepare_dir(out: Path, identity: dict) -> dict | None:
    """Check the output directory against the recipe. Returns the existing manifest, if any."""
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise WorkbenchError(f"{out / MANIFEST} is not an activation-cache manifest; choose another collect.out")
        if manifest["fingerprint"] != fingerprint(identity):
            diffs = [f"{sec}.{k}" for sec in identity for k in identity[sec]
                     if manifest["recipe"].get(sec, {}).get(k) != identity[sec][k]]
            raise WorkbenchError(f"{out} holds a cache made by a different recipe (differs in {', '.join(diffs) or 'its recipe'}); "
                                 "choose another collect.out or delete that directory; nothing was changed")
        return manifest
    if out.exists() and any(out.iterdir()):
        raise WorkbenchError(f"{out} exists and is not an activation cache; choose another collect.out or empty it")
    return None


def collect(recipe: Recipe) -> Summary:
    """Run collection for a recipe (one process, or one of several under `accelerate launch`)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = Accelerator(cpu=recipe.collect.device == "cpu")
    c, d = recipe.collect, recipe.data
    out = Path(c.out)
    identity = cache_identity(recipe)
    manifest = _prepare_dir(out, identity)
    if manifest is not None and manifest.get("complete"):
        summary = _summary_from_manifest(manifest)
        if acc.is_main_process:
            print(f"cache {out} is already complete")
            print(summary.table())
        return summary

    device = torch.device(c.device) if c.device else acc.device
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, device)
    num_layers = len(decoder_layers(model))
    layers = resolve_layers(list(c.layers), num_layers)
    max_ctx = max_context_of(model)
    if max_ctx is not None and d.context_length > max_ctx:
        raise WorkbenchError(f"data.context_length {d.context_length} is beyond the model's {max_ctx} positions; lower it")
    d_model = d_model_of(model)
    store_dtype = str(model.dtype).removeprefix("torch.") if c.store_dtype == "model" else c.store_dtype

    if acc.is_main_process and manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint(identity),
                    "recipe": identity, "layers": layers, "num_model_layers": num_layers, "d_model": d_model,
                    "store_dtype": store_dtype, "model_dtype": str(model.dtype).removeprefix("torch."),
                    "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                    "complete": False}
        write_json_atomic(out / MANIFEST, manifest)
    acc.wait_for_everyone()

    rank, world = acc.process_index, acc.num_processes
    drop_first_bos = tokenizer.bos_token_id
    bar = tqdm(total=data_mod.num_rows(d) * d.context_length, unit="tok", unit_scale=True,
               desc="collect", disable=not acc.is_main_process, dynamic_ncols=True)
    writer: ShardWriter | None = None
    stats: dict = {}
    num_batches = 0
    try:
        with capture_resid_post(model, layers) as run:
            rows = data_mod.iter_rows(d, tokenizer)
            done: dict[int, bool] = {}
            for batch in data_mod.iter_batches(rows, c.batch_size, tokenizer.pad_token_id):
                num_batches = batch.index + 1
                bar.update(int(batch.attention_mask_BL.sum()))
                shard = batch.index // c.shard_batches
                if shard % world != rank:
                    continue
                if shard not in done:
                    done[shard] = shard_is_complete(out / shard_name(shard))
                if done[shard]:
                    continue
                if writer is None or writer.final != out / shard_name(shard):
                    if writer is not None:
                        writer.finish(stats)
                    writer = ShardWriter(out, shard, batch.index, layers, d_model, store_dtype)
                    stats = {"tokens": 0, "sequences": 0, "layers": {str(L): {"kept": 0, "first_token": 0, "sink": 0} for L in layers}}
                _process_batch(run, batch, device, layers, recipe, drop_first_bos, store_dtype, writer, stats)
            if writer is not None:
                writer.finish(stats)
                writer = None
    finally:
        if writer is not None:
            writer.abort()
        bar.close()

    acc.wait_for_everyone()
    summary = Summary()
    if acc.is_main_process:
        summary = _finalize(out, manifest or read_manifest(out) or {}, num_batches, c.shard_batches)
        print(summary.table())
    acc.wait_for_everyone()
    return summary


def _process_batch(run, batch: data_mod.Batch, device, layers, recipe: Recipe, bos, store_dtype, writer, stats) -> None:
    c = recipe.collect
    ids_BL, mask_BL = batch.input_ids_BL, batch.attention_mask_BL
    acts = run(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device))
    valid_BL = mask_BL.bool()
    first_BL = first_token_mask(ids_BL, mask_BL, bos) if c.drop_first_token else torch.zeros_like(valid_BL)
    B, L = ids_BL.shape
    position_BL = torch.arange(L).expand(B, L)
    tokens = {
        "token_id": ids_BL[valid_BL].numpy().astype(np.int32),
        "sequence": batch.sequence_B[:, None].expand(B, L)[valid_BL].numpy(),
        "position": position_BL[valid_BL].numpy().astype(np.int32),
        "batch": np.full(int(valid_BL.sum()), batch.index, np.int32),
    }
    per_layer = {}
    for layer in layers:
        acts_BLD = acts[layer]
        flt = sink_filter(acts_BLD, c.sink_multiple, valid_BL.to(acts_BLD.device), c.sink_median)
        sink_BL = flt.sink_BL.cpu()
        reason_BL = torch.where(first_BL, FIRST_TOKEN, torch.where(sink_BL, SINK, 0)).to(torch.uint8)
        reason = reason_BL[valid_BL].numpy()
        per_layer[layer] = {
            "activations": to_stored(acts_BLD[valid_BL.to(acts_BLD.device)].cpu(), store_dtype),
            "norm": flt.norms_BL.cpu()[valid_BL].numpy(),
            "drop_reason": reason,
            "batch_median": np.array([flt.median.item()], np.float32),
        }
        s = stats["layers"][str(layer)]
        s["kept"] += int((reason == 0).sum())
        s["first_token"] += int((reason == FIRST_TOKEN).sum())
        s["sink"] += int((reason == SINK).sum())
    stats["tokens"] += len(tokens["token_id"])
    stats["sequences"] += B
    writer.append(tokens, per_layer)


def _finalize(out: Path, manifest: dict, num_batches: int, shard_batches: int) -> Summary:
    """Check every shard is there and complete, then mark the cache complete with its summary."""
    import h5py

    num_shards = -(-num_batches // shard_batches)
    summary = Summary(shards=num_shards)
    shards = []
    for index in range(num_shards):
        path = out / shard_name(index)
        if not shard_is_complete(path):
            raise WorkbenchError(f"shard {path} is missing after collection; re-run the same command to redo it")
        with h5py.File(path, "r") as h5:
            stats = json.loads(h5.attrs["stats"])
            shards.append({"file": shard_name(index), "num_tokens": int(h5.attrs["num_tokens"]),
                           "num_batches": int(h5.attrs["num_batches"]), "first_batch": int(h5.attrs["first_batch"])})
        summary.tokens += stats["tokens"]
        summary.sequences += stats["sequences"]
        summary.bytes += path.stat().st_size
        for layer, s in stats["layers"].items():
            summary.layers.setdefault(int(layer), LayerStats()).add(s)
    manifest.update(complete=True, shards=shards, summary=summary.as_dict())
    write_json_atomic(out / MANIFEST, manifest)
    return summary


def _summary_from_manifest(manifest: dict) -> Summary:
    s = manifest["summary"]
    return Summary(tokens=s["tokens"], sequences=s["sequences"], shards=s["shards"], bytes=s["bytes"],
                   layers={int(k): LayerStats(**v) for k, v in s["layers"].items()})

