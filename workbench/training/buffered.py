"""`workbench train` on a bounded cache (collect.max_shards_on_disk, cache/buffer.py): every layer it trains in
step, from one pass over the shards as collection writes them, releasing each shard once its checkpoint no
longer needs it.

    workbench collect recipes/demo-stream.yaml &  workbench train recipes/demo-stream.yaml
    workbench run recipes/demo-stream.yaml            # both at once, on one machine

What differs from training on a cache that keeps everything (loop.py): the data (training/stream.py: shards in
index order, shuffled within windows of train.shuffle_shards shards, one pass); the held-out tokens (the
buffer's first collect.holdout_shards shards, kept to the end, instead of the cache's tail); and that all layers
train in step, so that one pass of collection feeds them all. Checkpoints, resume, the SAE folders and every
check are loop.py's. The result depends only on the recipe and the data: not on which side started first, how
far collection got ahead, the number of processes of either side, or a kill -9 of either followed by the same
commands again.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from workbench.cache import ActivationCache, Manifest, buffer, prefetch
from workbench.config import Recipe, fingerprint, to_dict, train_identity, train_steps
from workbench.dist import Comm, on_main_first
from workbench.errors import WorkbenchError
from workbench.files import make_dir
from workbench.tracking import tracker_run
from workbench.training import loop
from workbench.training.saelens_step import SAELensTrainer, scaling_factor
from workbench.training.stream import CHECKPOINT, StreamSpec, layer_batches, stream


def wait_for_manifest(root: Path, show: bool) -> Manifest:
    """The buffer's manifest: training may start before collection has made it."""
    waiting = buffer.Waiting("train", show)
    while (manifest := Manifest.read(root)) is None:
        waiting.tick(f"for the cache at {root} to be created; is `workbench collect` running on this recipe?")
    if not manifest.is_cache:
        raise WorkbenchError(f"{manifest.path} is not an activation-cache manifest; give the directory `workbench collect` "
                             "writes (collect.out)")
    return manifest


def check_buffer(recipe: Recipe, manifest: Manifest) -> list[int]:
    """The layers to train, after checking that the recipe is the one the buffer is being written with."""
    from workbench.collect import cache_identity

    root, t = manifest.root, recipe.train
    if not buffer.is_bounded(manifest.data):
        raise WorkbenchError(f"the cache at {root} keeps every shard, but the recipe sets collect.max_shards_on_disk: set it "
                             "to null to train from this cache, or collect a bounded one into another collect.out")
    if manifest.data["fingerprint"] != fingerprint(cache_identity(recipe)):
        raise WorkbenchError(f"the buffer at {root} is being written by a different recipe (its model, data or collect "
                             "section differ): train with the recipe that collects it, or point train.cache elsewhere")
    layers = t.layers if t.layers is not None else list(manifest.data["layers"])
    missing = [layer for layer in layers if layer not in manifest.data["layers"]]
    if missing:
        raise WorkbenchError(f"train.layers {missing} are not in the buffer at {root} (it collects layers "
                             f"{manifest.data['layers']}); train those, or collect the others")
    return layers


def plan(recipe: Recipe, manifest: dict, layer: int) -> loop.LayerPlan:
    """A layer's plan on a bounded cache: loop.plan_layer's steps and schedule; no held-out fraction (the
    held-out shards are); the shuffle window is in the fingerprint."""
    t = recipe.train
    steps = train_steps(t)
    decay_start, k_anneal = loop.schedules(t, steps)
    identity = {"train": {k: v for k, v in train_identity(t).items() if k not in ("out", "layers", "checkpoint_every", "cache")}
                | {"shuffle_shards": t.shuffle_shards},
                "cache": manifest["fingerprint"], "layer": layer, "holdout_shards": buffer.holdout_shards(manifest)}
    return loop.LayerPlan(steps, decay_start, k_anneal, None, fingerprint(identity))


def train_buffered(recipe: Recipe) -> list[Path]:
    """Train every SAE of train.saes on every layer it trains, from a bounded cache. Returns the SAE folders."""
    from accelerate import Accelerator

    t, c = recipe.train, recipe.collect
    acc = Accelerator()
    loop.check_lanes(t, acc.num_processes)
    root = Path(t.cache or c.out)
    manifest = wait_for_manifest(root, acc.is_main_process)
    layers = check_buffer(recipe, manifest)
    plans = {layer: plan(recipe, manifest.data, layer) for layer in layers}
    with ExitStack() as held:
        held.enter_context(loop._lock_out(acc, t.out))

        def claim() -> None:
            for layer in layers:
                held.enter_context(buffer.claim_layer(root, layer, plans[layer].fingerprint, t.out))
            loop._check_out(t, plans)

        on_main_first(acc, claim)
        return _train(recipe, acc, root, manifest.data, layers, plans, held)


def _spec(recipe: Recipe, root: Path, manifest: dict, lanes: list[int]) -> StreamSpec:
    t, c = recipe.train, recipe.collect
    return StreamSpec(root=root, batch_size=t.batch_size, lanes=lanes, data_lanes=t.data_lanes, seed=t.seed,
                      window_shards=t.shuffle_shards, holdout=buffer.holdout_shards(manifest),
                      max_shards=c.max_shards_on_disk, checkpoint_every=t.checkpoint_every, steps=train_steps(t))


def _norm_factor(recipe: Recipe, spec: StreamSpec, layer: int, d_model: int, show: bool) -> float:
    """loop._norm_factor's rule, on the layer's first global batches of the stream."""
    t = recipe.train
    batches = layer_batches(spec, layer, show)
    try:
        if t.algorithm == "saelens":
            if t.saelens.normalize_activations == "none":
                return 1.0
            return 1 / scaling_factor(batches, d_model, t.saelens.n_batches_for_norm_estimate)
        if not t.normalize_activations:
            return 1.0
        mean_sq = [x_BD.pow(2).sum(dim=1).mean().item() for x_BD, _ in zip(batches, range(loop.NORM_SAMPLE_BATCHES), strict=False)]
    except ValueError:
        mean_sq = []
    if not mean_sq:
        raise WorkbenchError(f"the buffer has fewer training tokens in layer {layer} than one batch ({t.batch_size}); "
                             "lower train.batch_size or collect more tokens")
    factor = float(np.sqrt(np.mean(mean_sq)))
    if not math.isfinite(factor) or factor == 0:
        raise WorkbenchError(f"the activations of layer {layer} have a mean squared norm of {factor ** 2} (NaN, Inf or "
                             "zero): check the cache, or set train.normalize_activations=false")
    return factor


def _train(recipe: Recipe, acc, root: Path, manifest: dict, layers: list[int], plans: dict[int, loop.LayerPlan],
           held: ExitStack) -> list[Path]:
    from workbench.progress import progress

    t = recipe.train
    d_model = int(manifest["d_model"])
    shape = SimpleNamespace(d_model=d_model)  # what _make_trainer reads of a cache
    folders = {layer: [loop.layer_dir(t.out, layer) / s.name for s in t.saes] for layer in layers}
    todo = [layer for layer in layers if not all(loop._is_complete(f, plans[layer], t) for f in folders[layer])]
    lanes = list(range(acc.process_index, t.data_lanes, acc.num_processes))
    spec = _spec(recipe, root, manifest, lanes)
    comm = Comm(acc)
    runs = {}
    for layer in todo:
        path = loop.layer_dir(t.out, layer) / loop.CHECKPOINT
        checkpoint = loop._read_checkpoint(path, plans[layer], len(t.saes))
        norm = checkpoint["norm_factor"] if checkpoint is not None else _norm_factor(recipe, spec, layer, d_model,
                                                                                      acc.is_main_process)
        trainers = [loop._make_trainer(recipe, shape, layer, cfg, plans[layer], comm, acc.device) for cfg in t.saes]
        if checkpoint is not None:
            for trainer, state in zip(trainers, checkpoint["trainers"], strict=True):
                trainer.load_state_dict(state)
            loop._set_rng_state(checkpoint["rng"])
        elif t.init_from is not None:
            for trainer in trainers:
                trainer.fold_scaling(norm) if isinstance(trainer, SAELensTrainer) else trainer.sae.scale_biases(1 / norm)
        start = checkpoint["step"] if checkpoint is not None else 0
        position = checkpoint["reader"]["stream"] if checkpoint is not None else None
        runs[layer] = SimpleNamespace(path=path, norm=norm, trainers=trainers, start=start, position=position)

    holdout = buffer.holdout_shards(manifest)

    def prepare() -> None:
        for layer in todo:
            for folder in folders[layer]:
                make_dir(folder)
                loop._truncate_metrics(folder / loop.METRICS, runs[layer].start)
            if runs[layer].position is not None:  # a kill between a checkpoint and its release: release it now
                below = holdout + t.shuffle_shards * int(runs[layer].position["window"])
                buffer.write_release(root, layer, below, plans[layer].fingerprint, t.out)
        buffer.release(root)

    on_main_first(acc, prepare)

    def save(layer: int, step: int) -> None:
        run = runs[layer]
        loop._write_checkpoint(acc, run.path, plans[layer], step, run.norm, run.trainers, {"stream": run.position})

        def released() -> None:  # only once the checkpoint that no longer needs them is on disk
            below = holdout + t.shuffle_shards * int(run.position["window"])
            buffer.write_release(root, layer, below, plans[layer].fingerprint, t.out)
            buffer.release(root)

        on_main_first(acc, released)

    if todo:
        steps = train_steps(t)
        first = min(runs[layer].start for layer in todo)
        log_every = max(1, min(100, steps // 500))
        items = prefetch(stream(spec, todo, {layer: runs[layer].start for layer in todo},
                                {layer: runs[layer].position for layer in todo}, acc.is_main_process),
                         on_stop=buffer.STOP.set)  # a wait for a shard ends with the loop (an error, Ctrl-C)
        tracks = {layer: held.enter_context(tracker_run(recipe, f"layer_{layer}", to_dict(recipe), acc.is_main_process,
                                                        resume_step=runs[layer].start)) for layer in todo}
        bar = progress(total=steps, initial=first, unit="step", desc=f"layers {','.join(map(str, todo))}",
                       disable=not acc.is_main_process)
        tick, tick_step = time.perf_counter(), first
        done = first
        buffer.STOP.clear()
        try:
            for item in items:
                if item is CHECKPOINT:  # the buffer has no room for the next window until this releases shards
                    for layer in todo:
                        if runs[layer].start < done:
                            save(layer, done)
                    continue
                step, batch = item
                log = (step + 1) % log_every == 0 or step + 1 == steps
                checkpoint = (step + 1) % t.checkpoint_every == 0 or step + 1 == steps
                now = time.perf_counter()
                tokens_per_s = (step + 1 - tick_step) * t.batch_size / max(now - tick, 1e-9) if log else 0.0
                if log:
                    tick, tick_step = now, step + 1
                for layer, (x_BD, position) in batch.items():
                    run = runs[layer]
                    x_BD = x_BD.to(acc.device, non_blocking=True) / run.norm
                    logs = [trainer.update(x_BD, log=log) for trainer in run.trainers]
                    run.position = position
                    if log or checkpoint:
                        loop._stop_if_nonfinite(run.trainers, t.saes, layer, plans[layer], run.path)
                    if log and acc.is_main_process:
                        loop.record_logs(folders[layer], t, step, logs, tokens_per_s, tracks[layer])
                        if layer == todo[0]:
                            first = logs[0]
                            bar.set_postfix(loss=f"{first['loss']:.4g}", L0=f"{first['l0']:.1f}",
                                            FVE=f"{first['frac_variance_explained']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    if checkpoint:
                        save(layer, step + 1)
                done = step + 1
                bar.update(1)
        finally:
            bar.close()

    for layer in todo:
        run = runs[layer]
        with _held_out(root, acc.is_main_process) as cache:
            on_main_first(acc, partial(loop.finish_layer, recipe, cache, layer, run.trainers, plans[layer], run.norm,
                                       folders[layer], run.path, tracks[layer]))
    for layer in layers:  # done: this training needs no shard of the layer any more
        on_main_first(acc, partial(_release_all, root, layer, plans[layer].fingerprint, t.out))
    return [folder for layer in layers for folder in folders[layer]]


def _release_all(root: Path, layer: int, train_fingerprint: str, out: str) -> None:
    buffer.write_release(root, layer, buffer.DONE, train_fingerprint, out)
    buffer.release(root)


def _held_out(root: Path, show: bool) -> ActivationCache:
    """The buffer's held-out shards, read for eval_results.json (waiting for them if collection is behind)."""
    waiting = buffer.Waiting("train", show)
    while True:
        try:
            return ActivationCache(root)
        except WorkbenchError as err:
            if "not written yet" not in str(err):
                raise
            waiting.tick(f"for the held-out shards of {root}: {err}")


