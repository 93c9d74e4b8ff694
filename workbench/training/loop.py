"""The training loop, `workbench train`: BatchTopK and Matryoshka SAEs from the activation cache, under
Accelerate. It owns the data lanes, the normalisation, checkpoints and resume, the held-out evaluation
and the SAE folders; one update step and the loss are `workbench.training.step`.

    workbench train recipes/demo.yaml train.num_tokens=2_000_000
    accelerate launch --num_processes 2 -m workbench train recipes/demo.yaml

Output, the layout of the published dictionary_learning series:
    <train.out>/resid_post_layer_<L>/<name>/ae.pt, config.json, eval_results.json,
                                            metrics.jsonl, training_curves.png
    <train.out>/resid_post_layer_<L>/checkpoint.pt     while the layer trains (all its SAEs)

Data: the training split of the cache is read as `train.data_lanes` interleaved streams (lane l is
`cache.batches(rank=l, world_size=lanes)`, epoch after epoch) and a global batch is one lane batch
from each lane, in lane order; process r of W handles lanes r, r+W, ... So the global batches do not
depend on the number of processes, and every batch is read once and fed to every SAE of the layer.
The last blocks of the cache (train.eval_tokens tokens, at most half the layer) are held out:
eval_results.json is computed on them, and the threshold stage reads them (config.json records the
fraction).

Resume: re-running the same command continues from the layer's last checkpoint (written atomically
every train.checkpoint_every steps and after the last step) and ends with the same weights as an
uninterrupted run. The checkpoint records each lane's read position (`ReadPosition`: the window, the
batch in it, the shuffle's RNG state and the rows carried into the window), so a resume re-reads one
window per lane, not the batches already trained on: its cost does not grow with the step. The checkpoint is deleted once every SAE folder of the layer is written. It holds
only tensors, numbers, strings, lists and dicts, so it is read with torch.load(weights_only=True): a
planted checkpoint.pt cannot run code.

A bounded cache (collect.max_shards_on_disk) is trained by training/buffered.py instead: all layers in step,
from one pass over its shards as collection writes them; it uses this module's plan, trainers, checkpoints
and SAE folders.

Safety: one `workbench train` at a time holds train.out (a lock); an SAE folder that holds an SAE
of another recipe is refused, not overwritten; a NaN or Inf loss stops the run before any checkpoint
or SAE file records it, and an SAE folder is written only when every SAE of the layer is finite.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.cache import ActivationCache, ReadPosition, prefetch
from workbench.config import (
    Recipe,
    SAEConfig,
    TrainConfig,
    fingerprint,
    sae_algorithm,
    schedule_step,
    to_dict,
    train_identity,
    train_steps,
)
from workbench.dist import Comm, on_main_first
from workbench.errors import WorkbenchError
from workbench.files import folder_lock, make_dir, read_json_object, write_atomic, write_error, write_text
from workbench.formats import dictionary_learning as dl_format
from workbench.formats import saelens
from workbench.formats.convert import load_trainable
from workbench.hub import resolve_sae_path
from workbench.metrics import evaluate_sae
from workbench.provenance import Provenance
from workbench.sae import SAE
from workbench.sae.registry import ARCHITECTURES
from workbench.tracking import Log, check_trackers, tracker_run
from workbench.training.saelens_step import SAELensTrainer, init_weights_, scaling_factor
from workbench.training.step import Trainer

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: plain tensors and numbers only (weights_only=True); 1 pickled numpy's RNG state
METRICS = "metrics.jsonl"
CURVES = "training_curves.png"
NORM_SAMPLE_BATCHES = 100  # batches averaged for the normalisation factor (dictionary_learning: 100)


def layer_dir(out: str | Path, layer: int) -> Path:
    """<out>/resid_post_layer_<L>: a layer's folder in a run (the published series' layout)."""
    return Path(out) / dl_format.resid_post_name(layer)


@dataclass
class LayerPlan:
    """What a recipe's train section resolves to for one layer of one cache."""

    steps: int
    decay_start: int | None  # a step index
    k_anneal_steps: int | None
    holdout_fraction: float
    fingerprint: str  # of everything that determines the result; a checkpoint must match it


def train(recipe: Recipe) -> list[Path]:
    """Train every SAE of train.saes on every layer of train.layers. Returns the SAE folders."""
    from accelerate import Accelerator

    t = recipe.train
    check_trackers(recipe)
    if recipe.collect.max_shards_on_disk is not None:  # a bounded cache: every layer in step, as it is written
        from workbench.training.buffered import train_buffered

        return train_buffered(recipe)
    acc = Accelerator()
    check_lanes(t, acc.num_processes)
    with ActivationCache(t.cache or recipe.collect.out) as cache:
        layers = t.layers if t.layers is not None else cache.layers
        plans = {layer: plan_layer(recipe, cache, layer) for layer in layers}  # every recipe error before any write
        with _lock_out(acc, t.out):
            on_main_first(acc, lambda: _check_out(t, plans))
            return [folder for layer in layers for folder in train_layer(recipe, acc, cache, layer, plans[layer])]


def check_lanes(t: TrainConfig, num_processes: int) -> None:
    if t.data_lanes % num_processes:
        raise WorkbenchError(f"train.data_lanes ({t.data_lanes}) must be a multiple of the number of processes "
                             f"({num_processes}); set train.data_lanes={num_processes * max(1, t.data_lanes // num_processes)}")


def is_trained(recipe: Recipe) -> bool:
    """Whether every SAE of train.saes is finished, for this recipe, on every layer it trains: the
    pipeline's check, from the SAE folders themselves (a deleted or unreadable one is not finished)."""
    t, plans = recipe.train, layer_plans(recipe)
    if plans is None:
        return False  # train itself says what is wrong
    return all(_is_complete(layer_dir(t.out, layer) / cfg.name, plan, t) for layer, plan in plans.items() for cfg in t.saes)


def layer_plans(recipe: Recipe) -> dict[int, LayerPlan] | None:
    """The plan of every layer train.layers trains, from the recipe's cache; None while that cache cannot
    be read (not collected yet, or damaged: train itself then says what is wrong)."""
    t = recipe.train
    try:
        with ActivationCache(t.cache or recipe.collect.out) as cache:
            layers = t.layers if t.layers is not None else cache.layers
            if cache.bounded:
                from workbench.training import buffered

                return {layer: buffered.plan(recipe, cache.manifest, layer) for layer in layers}
            return {layer: plan_layer(recipe, cache, layer) for layer in layers}
    except WorkbenchError:
        return None


@contextmanager
def _lock_out(acc, out: str) -> Iterator[None]:
    """train.out for one `workbench train` at a time. The processes of one `accelerate launch` are one
    run: the main process holds the lock for all of them, and tells them when it could not."""
    with ExitStack() as stack:
        def lock() -> None:
            stack.enter_context(folder_lock(out, "workbench train"))

        on_main_first(acc, lock)
        yield


def _check_out(t: TrainConfig, plans: dict[int, LayerPlan]) -> None:
    """Refuse, before anything is written, an SAE folder that holds a finished SAE of another recipe
    (collect refuses a cache of another recipe the same way): training would silently replace it."""
    for layer, plan in plans.items():
        for cfg in t.saes:
            folder = layer_dir(t.out, layer) / cfg.name
            config = _finished_config(folder)
            if config is not None and _fingerprint_of(config, folder) != plan.fingerprint:
                trainer = config["trainer"] if isinstance(config.get("trainer"), dict) else {}
                provenance = _provenance_of(config, folder)
                found = {"arch": provenance.arch if provenance is not None else None, "width": trainer.get("dict_size"), "k": trainer.get("k"),
                         "steps": trainer.get("steps")}
                wanted = {"arch": cfg.arch, "width": cfg.width, "k": cfg.k, "steps": plan.steps}
                diffs = ", ".join(f"{key} {found[key]} there, {wanted[key]} here" for key in found if found[key] != wanted[key])
                raise WorkbenchError(f"{folder} holds a finished SAE made by a different train recipe or cache"
                                     f"{f' ({diffs})' if diffs else ''}; choose another train.out, or delete that SAE "
                                     "folder to train it again; nothing was changed")


def plan_layer(recipe: Recipe, cache: ActivationCache, layer: int) -> LayerPlan:
    """Steps and schedule points, and the held-out share of the cache: train.eval_tokens tokens (at most
    half of the layer) for eval_results.json, which the threshold stage reads too. The schedule points are
    dictionary_learning's (its SAEs'); each algorithm's schedule is checked against the run."""
    t = recipe.train
    cache.num_tokens(layer)  # a clear error for a layer the cache does not have
    steps = train_steps(t)
    decay_start, k_anneal = schedules(t, steps)
    holdout = min(0.5, t.eval_tokens / cache.num_tokens(layer)) if t.eval_tokens > 0 else 0.0
    identity = {"train": {k: v for k, v in train_identity(t).items() if k not in ("out", "layers", "checkpoint_every", "cache")},
                "cache": cache.manifest["fingerprint"], "layer": layer, "holdout_fraction": holdout}
    return LayerPlan(steps, decay_start, k_anneal, holdout, fingerprint(identity))


def schedules(t: TrainConfig, steps: int) -> tuple[int | None, int | None]:
    """The run's schedule points (decay start, k annealing) as steps, each algorithm's checked against the run."""
    algorithms = {sae_algorithm(t, cfg) for cfg in t.saes}
    if "saelens" in algorithms:
        _saelens_schedule(t, steps)
    return _schedule(t, steps) if "dictionary_learning" in algorithms else (None, None)


def _schedule(t: TrainConfig, steps: int) -> tuple[int | None, int | None]:
    """dictionary_learning's schedule points as steps (decay start, k annealing), checked against the run."""
    if steps <= t.warmup_steps:
        raise WorkbenchError(f"train.num_tokens {t.num_tokens} is {steps} steps of {t.batch_size} tokens, not more than "
                             f"train.warmup_steps ({t.warmup_steps}); raise num_tokens or lower warmup_steps")
    decay_start = schedule_step(t.decay_start, steps)
    if decay_start is not None and not t.warmup_steps < decay_start < steps:
        raise WorkbenchError(f"train.decay_start resolves to step {decay_start}: it must lie after warmup_steps "
                             f"({t.warmup_steps}) and before the last step ({steps}); change it or set it to null")
    k_anneal = schedule_step(t.k_anneal_steps, steps) or None
    if k_anneal is not None and k_anneal >= steps:
        raise WorkbenchError(f"train.k_anneal_steps resolves to {k_anneal} steps, not fewer than the {steps} steps of the run")
    return decay_start, k_anneal


def _saelens_schedule(t: TrainConfig, steps: int) -> None:
    """SAELens' schedule has no decay start or k annealing; its warmup and decay must fit in the run."""
    s = t.saelens
    if s.lr_warm_up_steps + s.lr_decay_steps > steps:
        raise WorkbenchError(f"train.saelens.lr_warm_up_steps + lr_decay_steps ({s.lr_warm_up_steps} + {s.lr_decay_steps}) "
                             f"exceed the {steps} steps of the run; lower them or raise train.num_tokens")


def train_layer(recipe: Recipe, acc, cache: ActivationCache, layer: int, plan: LayerPlan) -> list[Path]:
    """Train all SAEs of one layer from one pass over its batches; resume from its checkpoint."""
    from workbench.progress import progress

    t = recipe.train
    folders = [layer_dir(t.out, layer) / s.name for s in t.saes]
    checkpoint_path = layer_dir(t.out, layer) / CHECKPOINT
    if all(_is_complete(folder, plan, t) for folder in folders):
        if acc.is_main_process:
            print(f"layer {layer}: already trained in {layer_dir(t.out, layer)}")
            checkpoint_path.unlink(missing_ok=True)  # left behind if a kill came after the last SAE was written
        return folders

    checkpoint = _read_checkpoint(checkpoint_path, plan, len(t.saes))
    if checkpoint is not None:
        norm_factor = checkpoint["norm_factor"]
    else:
        norm_factor = _norm_factor(cache, layer, t, plan)
    comm = Comm(acc)
    trainers = [_make_trainer(recipe, cache, layer, cfg, plan, comm, acc.device) for cfg in t.saes]
    if checkpoint is not None:
        for trainer, state in zip(trainers, checkpoint["trainers"], strict=True):
            trainer.load_state_dict(state)
        _set_rng_state(checkpoint["rng"])
    elif t.init_from is not None:
        for trainer in trainers:  # the loaded SAE works on raw activations; training sees x / norm_factor
            if isinstance(trainer, SAELensTrainer):
                trainer.fold_scaling(norm_factor)  # undoes the fold at the end (input scale 1 / norm_factor)
            else:
                trainer.sae.scale_biases(1 / norm_factor)
    start = checkpoint["step"] if checkpoint is not None else 0

    def prepare_folders() -> None:
        for folder in folders:
            make_dir(folder)
            _truncate_metrics(folder / METRICS, start)

    on_main_first(acc, prepare_folders)

    lanes = list(range(acc.process_index, t.data_lanes, acc.num_processes))
    batches = prefetch(global_batches(cache.root, layer, lanes, t, plan, start,
                                      checkpoint.get("reader") if checkpoint is not None else None))
    positions: dict[int, dict] = {}
    log_every = max(1, min(100, plan.steps // 500))
    bar = progress(total=plan.steps, initial=start, unit="step", desc=f"layer {layer}", disable=not acc.is_main_process)
    tick, tick_step = time.perf_counter(), start

    with tracker_run(recipe, f"layer_{layer}", to_dict(recipe), acc.is_main_process, resume_step=start) as track:
        try:  # the bar ends its line, so that an error is printed on its own
            for step in range(start, plan.steps):
                x_BD, positions = next(batches)
                x_BD = x_BD.to(acc.device, non_blocking=True) / norm_factor
                log = (step + 1) % log_every == 0 or step + 1 == plan.steps
                logs = [trainer.update(x_BD, log=log) for trainer in trainers]
                save = (step + 1) % t.checkpoint_every == 0 or step + 1 == plan.steps  # the last: a kill while finishing redoes only that
                if log or save:  # before anything records this step: a checkpoint must never hold NaN weights
                    _stop_if_nonfinite(trainers, t.saes, layer, plan, checkpoint_path)
                if log:
                    now = time.perf_counter()
                    tokens_per_s = (step + 1 - tick_step) * t.batch_size / max(now - tick, 1e-9)
                    tick, tick_step = now, step + 1
                    if acc.is_main_process:
                        record_logs(folders, t, step, logs, tokens_per_s, track)
                        first = logs[0]
                        bar.set_postfix(loss=f"{first['loss']:.4g}", L0=f"{first['l0']:.1f}",
                                        FVE=f"{first['frac_variance_explained']:.3f}",
                                        dead=f"{first['dead'] / t.saes[0].width:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                bar.update(1)  # after the postfix: a line it prints carries this step's figures
                if save:
                    _write_checkpoint(acc, checkpoint_path, plan, step + 1, norm_factor, trainers, positions)
        finally:
            bar.close()
        on_main_first(acc, lambda: finish_layer(recipe, cache, layer, trainers, plan, norm_factor, folders,
                                                checkpoint_path, track))
    return folders


def record_logs(folders: list[Path], t: TrainConfig, step: int, logs: list[dict], tokens_per_s: float, track: Log) -> None:
    """A log step of a layer's SAEs: a line of each metrics.jsonl, and the trackers (main process only)."""
    for folder, entry in zip(folders, logs, strict=True):
        _append_metrics(folder / METRICS, {"step": step + 1, "tokens": (step + 1) * t.batch_size,
                                           **entry, "tokens_per_s": tokens_per_s})
    track({f"{cfg.name}/{key}": value for cfg, entry in zip(t.saes, logs, strict=True)
           for key, value in {**entry, "dead_fraction": entry["dead"] / cfg.width,
                              "tokens_per_s": tokens_per_s}.items()}, step + 1)


def finish_layer(recipe: Recipe, cache: ActivationCache, layer: int, trainers: list, plan: LayerPlan, norm_factor: float,
                 folders: list[Path], checkpoint_path: Path, track: Log) -> None:
    """Write a trained layer's SAE folders and delete its checkpoint (main process). Every SAE of the layer is
    checked and evaluated before the first file is written."""
    t = recipe.train
    outputs = [_finish(recipe, cache, layer, cfg, trainer, plan, norm_factor)
               for trainer, cfg in zip(trainers, t.saes, strict=True)]
    for (sae, config, eval_results), cfg, folder in zip(outputs, t.saes, folders, strict=True):
        dl_format.save_folder(sae, folder, config, eval_results)
        plot_curves(folder / METRICS, folder / CURVES,
                    title=f"layer {layer} {cfg.name} ({cfg.arch}, width {cfg.width}, k {cfg.k})")
        if eval_results is not None:
            track({f"{cfg.name}/eval/{key}": value for key, value in eval_results.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}, plan.steps)
    checkpoint_path.unlink(missing_ok=True)


def _stop_if_nonfinite(trainers: list[Trainer], saes: list[SAEConfig], layer: int, plan: LayerPlan, checkpoint: Path) -> None:
    """A NaN or Inf loss ends the run with the SAE and the step; nothing after the last good checkpoint is kept."""
    for trainer, cfg in zip(trainers, saes, strict=True):
        step = trainer.nonfinite_step()
        if step is not None:
            kept = f"the checkpoint {checkpoint} is from before it" if checkpoint.is_file() else "no checkpoint was written"
            raise WorkbenchError(
                f"layer {layer}, SAE {cfg.name}: the loss became NaN or Inf at step {step} of {plan.steps}, from bad "
                f"activations (check the cache) or too high a learning rate (lower train.lr); no SAE file was written "
                f"and {kept}")


def _make_trainer(recipe: Recipe, cache: ActivationCache, layer: int, cfg: SAEConfig, plan: LayerPlan,
                  comm: Comm, device: torch.device) -> Trainer | SAELensTrainer:
    t = recipe.train
    if t.init_from is not None:
        sae = _load_init(t.init_from, layer, cfg, cache.d_model)
    else:
        torch.manual_seed(t.seed)  # as dictionary_learning: the trainer's seed, then the SAE
        sae = ARCHITECTURES[cfg.arch].build(cache.d_model, cfg.width, cfg.k, cfg.group_fractions)
    autocast = getattr(torch, t.autocast_dtype) if t.autocast_dtype else None
    if sae_algorithm(t, cfg) == "saelens":
        if t.init_from is None:
            torch.manual_seed(t.seed)
            init_weights_(sae, t.saelens.decoder_init_norm)
        return SAELensTrainer(sae.to(device), plan.steps, t.saelens, fine_tune=t.init_from is not None,
                              autocast_dtype=autocast, comm=comm)
    sae.to(device)
    return Trainer(sae, plan.steps, lr=t.lr, warmup_steps=t.warmup_steps, decay_start=plan.decay_start,
                   k_anneal_steps=plan.k_anneal_steps, auxk_alpha=t.auxk_alpha, threshold_beta=t.threshold_beta,
                   threshold_start_step=t.threshold_start_step, dead_feature_threshold=t.dead_feature_threshold,
                   group_weights=cfg.group_weights, fine_tune=t.init_from is not None, autocast_dtype=autocast, comm=comm)


def _load_init(init_from: str, layer: int, cfg: SAEConfig, d_model: int) -> SAE:
    """The SAE to fine-tune: `init_from` is one SAE folder in either format, or a dictionary_learning series
    with resid_post_layer_<L>/<name>/. A SAELens folder is converted exactly (load_trainable), the recipe's
    k standing in for a training k it does not record."""
    root = resolve_sae_path(init_from)  # a local folder or an hf:// reference (workbench.hub)
    marks = (dl_format.AE_FILE, saelens.CFG_FILE, saelens.WEIGHTS_FILE)
    folder = next((f for f in (root, layer_dir(root, layer) / cfg.name) if any((f / m).is_file() for m in marks)), None)
    if folder is None:
        raise WorkbenchError(f"train.init_from {root} has no ae.pt (nor resid_post_layer_{layer}/{cfg.name}/ae.pt) and "
                             f"no {saelens.CFG_FILE}; give an SAE folder in either format, or a dictionary_learning series")
    sae = load_trainable(folder, k=cfg.k)
    arch = ARCHITECTURES[cfg.arch]
    problems = []
    if not isinstance(sae, arch.module):
        problems.append(f"it is a {type(sae).__name__}, the recipe says arch {cfg.arch}")
    if sae.activation_dim != d_model:
        problems.append(f"d_model {sae.activation_dim} != the cache's {d_model}")
    if sae.dict_size != cfg.width:
        problems.append(f"width {sae.dict_size} != train.saes {cfg.name}.width {cfg.width}")
    if int(sae.k) != cfg.k:
        problems.append(f"k {int(sae.k)} != train.saes {cfg.name}.k {cfg.k}")
    if isinstance(sae, arch.module) and arch.grouped and sae.dict_size == cfg.width:
        wanted = arch.group_sizes(cfg.width, cfg.group_fractions)
        if sae.group_sizes.tolist() != wanted:
            problems.append(f"group sizes {sae.group_sizes.tolist()} != {wanted} from group_fractions")
    if problems:
        raise WorkbenchError(f"cannot fine-tune {folder}: {'; '.join(problems)}; make the recipe match the checkpoint")
    return sae


def _norm_factor(cache: ActivationCache, layer: int, t: TrainConfig, plan: LayerPlan) -> float:
    """Training sees x / norm_factor (1.0: not normalised). dictionary_learning: sqrt(mean ||x||^2) over the first
    NORM_SAMPLE_BATCHES training batches; SAELens' expected_average_only_in: 1 / its scaling factor, from the first
    n_batches_for_norm_estimate. One stream, so every process computes the same factor."""
    if t.algorithm == "saelens":
        if t.saelens.normalize_activations == "none":
            return 1.0
        stream = cache.batches(layer, t.batch_size, seed=t.seed, holdout_fraction=plan.holdout_fraction)
        try:
            return 1 / scaling_factor(stream, cache.d_model, t.saelens.n_batches_for_norm_estimate)
        except ValueError:
            raise WorkbenchError(f"the cache has fewer training tokens in layer {layer} than one batch ({t.batch_size}); "
                                 "lower train.batch_size or collect more tokens") from None
    if not t.normalize_activations:
        return 1.0
    mean_sq = []
    for i, x_BD in enumerate(cache.batches(layer, t.batch_size, seed=t.seed, holdout_fraction=plan.holdout_fraction)):
        mean_sq.append(x_BD.pow(2).sum(dim=1).mean().item())
        if i + 1 == NORM_SAMPLE_BATCHES:
            break
    if not mean_sq:
        raise WorkbenchError(f"the cache has fewer training tokens in layer {layer} than one batch ({t.batch_size}); "
                             "lower train.batch_size or collect more tokens")
    factor = float(np.sqrt(np.mean(mean_sq)))
    if not math.isfinite(factor) or factor == 0:  # training would divide every batch by it
        raise WorkbenchError(f"the activations of layer {layer} have a mean squared norm of {factor ** 2} (NaN, Inf or "
                             "zero): check the cache, or set train.normalize_activations=false")
    return factor


def global_batches(root: Path, layer: int, lanes: list[int], t: TrainConfig, plan: LayerPlan, start: int,
                   positions: dict[int, dict] | None) -> Iterator[tuple[torch.Tensor, dict[int, dict]]]:
    """This process's share of the global batches of steps start..steps-1: one batch from each of its
    lanes, concatenated, each with the lanes' read positions after it (what a checkpoint records).
    positions: the checkpoint's, by lane; None (a checkpoint written before reader positions existed)
    skips the first `start` batches of each lane by reading them."""
    if positions is not None and sorted(positions) != list(range(t.data_lanes)):
        raise WorkbenchError(f"the layer {layer} checkpoint records read positions for lanes {sorted(positions)}, not the "
                             f"{t.data_lanes} of train.data_lanes; delete {CHECKPOINT} to start the layer over")
    with ActivationCache(root) as cache:  # its own file handles: this runs in the prefetch thread
        streams = [_lane(cache, layer, lane, t, plan, None if positions is None else positions[lane],
                         skip=start if positions is None else 0) for lane in lanes]
        for _ in range(start, plan.steps):
            batch = [next(s) for s in streams]
            yield torch.cat([x_BD for x_BD, _ in batch]), {lane: pos for lane, (_, pos) in zip(lanes, batch, strict=True)}


def _lane(cache: ActivationCache, layer: int, lane: int, t: TrainConfig, plan: LayerPlan, position: dict | None,
          skip: int = 0) -> Iterator[tuple[torch.Tensor, dict]]:
    """Lane `lane` of the training split, epoch after epoch (epoch e shuffled with seed
    seed * 100003 + e, shared by all lanes so that they partition the blocks), from `position`
    ({"epoch", "reader": ReadPosition.to_state()}, None: the start) or after `skip` batches; each batch
    with the position after it."""
    lane_batch = t.batch_size // t.data_lanes
    epoch = 0 if position is None else position["epoch"]
    start = None if position is None else ReadPosition.from_state(position["reader"])
    while True:
        n = 0
        for x_BD, after in cache.positioned_batches(layer, lane_batch, seed=t.seed * 100003 + epoch, rank=lane,
                                                    world_size=t.data_lanes, holdout_fraction=plan.holdout_fraction,
                                                    start=start):
            n += 1
            if skip:
                skip -= 1
                continue
            yield x_BD, {"epoch": epoch, "reader": after.to_state()}
        if n == 0 and start is None:
            raise WorkbenchError(f"lane {lane} of {t.data_lanes} got no batch of {lane_batch} tokens from layer {layer}: "
                                 "the cache is too small for these lanes; lower train.data_lanes or train.batch_size")
        epoch, start = epoch + 1, None


def _finish(recipe: Recipe, cache: ActivationCache, layer: int, cfg: SAEConfig, trainer: Trainer, plan: LayerPlan,
            norm_factor: float) -> tuple[SAE, dict, dict | None]:
    """Fold the normalisation into the SAE, check it is finite, evaluate it on held-out tokens: what its
    folder gets (the SAE, config.json, eval_results.json)."""
    t, sae = recipe.train, trainer.sae
    if isinstance(trainer, SAELensTrainer):  # SAELens' fit() and save_inference_model folds, threshold included
        trainer.fold_for_inference(1 / norm_factor)
    else:
        sae.scale_biases(norm_factor)
    check_finite(sae, f"layer {layer}, SAE {cfg.name}")
    config = folder_config(recipe, cache, layer, cfg, trainer, plan, norm_factor)
    eval_results = None
    if t.eval_tokens > 0:
        eval_results = _evaluate(sae, cache, layer, t, plan)
        eval_results["dead_latents_training"] = int(trainer.dead_mask().sum() if isinstance(trainer, SAELensTrainer) else
                                                    (trainer.num_tokens_since_fired >= t.dead_feature_threshold).sum())
    return sae, config, eval_results


def check_finite(sae: SAE, what: str) -> None:
    """Refuse to save an SAE with a NaN or Inf weight or threshold: it would load and silently give garbage."""
    bad = [name for name, value in sae.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise WorkbenchError(f"{what}: {', '.join(bad)} hold NaN or Inf after training, so it was not written; the "
                             "activations or the learning rate are bad (check the cache, or lower train.lr)")


def _evaluate(sae: SAE, cache: ActivationCache, layer: int, t: TrainConfig, plan: LayerPlan) -> dict:
    """eval_results.json: the threshold path on held-out tokens, plus the batch top-k rule's l0 and FVE."""
    batch = min(t.batch_size, t.eval_tokens)

    def holdout() -> Iterator[torch.Tensor]:
        stream = cache.batches(layer, batch, shuffle=False, holdout_fraction=plan.holdout_fraction, split="holdout")
        yield from itertools.islice(stream, max(1, t.eval_tokens // batch))

    ctx_len = cache.manifest["recipe"]["data"]["context_length"]
    try:
        results = evaluate_sae(sae, holdout(), context_length=ctx_len)
        topk = evaluate_sae(sae, holdout(), use_threshold=False, context_length=ctx_len)
    except ValueError:
        raise WorkbenchError(f"the held-out part of layer {layer} has fewer than {batch} tokens; "
                             "lower train.eval_tokens or collect more tokens") from None
    results["l0_batch_topk"] = topk["l0"]
    results["frac_variance_explained_batch_topk"] = topk["frac_variance_explained"]
    return results


def folder_config(recipe: Recipe, cache: ActivationCache, layer: int, cfg: SAEConfig, trainer: Trainer,
                  plan: LayerPlan, norm_factor: float) -> dict:
    """config.json: dictionary_learning's trainer and buffer sections, and the workbench section (the SAE's
    own algorithm; the normalisation the layer's, train.algorithm's)."""
    t, sae, m = recipe.train, trainer.sae, cache.manifest
    device = str(sae.b_dec.device)
    model_name = m["recipe"]["model"]["name"]
    algorithm = sae_algorithm(t, cfg)
    saelens_run = algorithm == "saelens"
    # With SAELens' algorithm, dictionary_learning's keys get their nearest SAELens values (aux coefficient,
    # warmup, 1 - the threshold rate, from step 0); its own settings are the workbench section's `saelens`.
    s = t.saelens
    trainer_cfg = dl_format.trainer_section(
        sae, lr=trainer.lr, steps=plan.steps, auxk_alpha=s.aux_loss_coefficient if saelens_run else t.auxk_alpha,
        warmup_steps=s.lr_warm_up_steps if saelens_run else t.warmup_steps,
        decay_start=None if saelens_run else plan.decay_start,
        threshold_beta=1 - s.topk_threshold_lr if saelens_run else t.threshold_beta,
        threshold_start_step=0 if saelens_run else t.threshold_start_step,
        seed=t.seed, device=device, layer=layer, lm_name=model_name, group_fractions=cfg.group_fractions,
        group_weights=trainer.group_weights)
    # n_ctxs: the contexts the data passed through; from a bounded cache, those of a shuffle window, which
    # is what dictionary_learning's ActivationBuffer calls n_ctxs (the contexts it holds at a time)
    collected = m["recipe"]["collect"]
    n_ctxs = (t.shuffle_shards * collected["shard_batches"] * collected["batch_size"] if cache.bounded
              else m["summary"]["sequences"])
    buffer_cfg = dl_format.buffer_section(
        cache.d_model, ctx_len=m["recipe"]["data"]["context_length"], n_ctxs=n_ctxs,
        refresh_batch_size=m["recipe"]["collect"]["batch_size"], out_batch_size=t.batch_size, device=device)
    provenance = Provenance(
        arch=cfg.arch, model=model_name, dataset=m["recipe"]["data"]["path"], layer=layer,
        sink_multiple=cache.sink_multiple, sink_median=m["recipe"]["collect"]["sink_median"],
        drop_first_token=cache.drop_first_token,
        normalize_activations=(s.normalize_activations != "none") if t.algorithm == "saelens" else t.normalize_activations,
        norm_factor=norm_factor,
        k_anneal_steps=trainer.k_anneal_steps,
        cache=str(cache.root.resolve()), cache_fingerprint=m["fingerprint"],
        holdout_fraction=plan.holdout_fraction, eval_tokens=t.eval_tokens,
        tokens_trained=plan.steps * t.batch_size, steps=plan.steps, batch_size=t.batch_size,
        data_lanes=t.data_lanes, dead_feature_threshold=None if saelens_run else t.dead_feature_threshold,
        autocast_dtype=t.autocast_dtype, init_from=t.init_from, train_fingerprint=plan.fingerprint,
        algorithm=algorithm, saelens=to_dict(s) if saelens_run else None)
    return {"trainer": trainer_cfg, "buffer": buffer_cfg, dl_format.EXTRA_SECTION: provenance.to_dict()}


def _finished_config(folder: Path) -> dict | None:
    """config.json of the finished SAE in `folder`, or None when it holds none (config.json is written
    after ae.pt, so a folder without it holds none)."""
    config = read_json_object(folder / dl_format.CONFIG_FILE, fix="delete that SAE folder to train it again")
    return config if config is not None and (folder / dl_format.AE_FILE).is_file() else None


def _provenance_of(config: dict, folder: Path) -> Provenance | None:
    return Provenance.from_dict(config.get(dl_format.EXTRA_SECTION), str(folder / dl_format.CONFIG_FILE))


def _fingerprint_of(config: dict, folder: Path) -> str:
    """The train fingerprint a config.json records ("" for an SAE the workbench did not train)."""
    provenance = _provenance_of(config, folder)
    return (provenance.train_fingerprint or "") if provenance is not None else ""


def _is_complete(folder: Path, plan: LayerPlan, t: TrainConfig) -> bool:
    """A finished SAE of this very plan: its files are there, its config names the plan and its ae.pt
    opens (a truncated or damaged one is trained again)."""
    needed = [dl_format.AE_FILE, dl_format.CONFIG_FILE] + ([dl_format.EVAL_FILE] if t.eval_tokens > 0 else [])
    config = _finished_config(folder) if all((folder / name).is_file() for name in needed) else None
    if config is None or _fingerprint_of(config, folder) != plan.fingerprint:
        return False
    try:
        dl_format.load_state_dict(folder / dl_format.AE_FILE, mmap=True)  # maps the tensors, reads none
    except WorkbenchError:
        return False
    return True


def _write_checkpoint(acc, path: Path, plan: LayerPlan, step: int, norm_factor: float, trainers: list[Trainer],
                      positions: dict[int, dict]) -> None:
    """All SAEs of the layer with their optimiser state, counters, the step, every lane's read position
    (gathered from the processes: a resume reads on from there, whatever the number of processes) and
    RNG, written atomically (files.write_atomic), so a kill or a full disk leaves the previous one intact."""
    from accelerate.utils import gather_object

    reader = {lane: pos for part in gather_object([positions]) for lane, pos in part.items()}

    def write() -> None:
        state = {"version": CHECKPOINT_VERSION, "fingerprint": plan.fingerprint, "step": step, "norm_factor": norm_factor,
                 "trainers": [trainer.state_dict() for trainer in trainers], "rng": _rng_state(), "reader": reader}
        write_atomic(path, lambda fh: torch.save(state, fh),
                     resume="re-run the same command to resume from the previous checkpoint")

    on_main_first(acc, write)


def _read_checkpoint(path: Path, plan: LayerPlan, n_saes: int) -> dict | None:
    if not path.is_file():
        return None
    start_over = "delete it to start the layer over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only unpickler refused it before anything in it ran
        raise WorkbenchError(f"checkpoint {path} holds objects other than tensors and numbers, so it was refused without "
                             f"running it; it was written by an older workbench or by someone else: {start_over}") from None
    except Exception as err:  # a truncated or foreign file: say which and how to recover
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise WorkbenchError(f"checkpoint {path} is unreadable ({first}); {start_over}") from None
    if not isinstance(state, dict):
        raise WorkbenchError(f"checkpoint {path} is not a workbench training checkpoint; {start_over}")
    if state.get("fingerprint") != plan.fingerprint:
        raise WorkbenchError(f"checkpoint {path} was written by a different train recipe or cache; restore that "
                             "recipe to resume, or delete the checkpoint to start the layer over")
    trainers = state.get("trainers")
    if state.get("version") != CHECKPOINT_VERSION or not isinstance(trainers, list) or len(trainers) != n_saes:
        raise WorkbenchError(f"checkpoint {path} is from another workbench version (format {state.get('version', 1)}, "
                             f"this one reads {CHECKPOINT_VERSION}); {start_over}")
    return state


def _rng_state() -> dict:
    """Every RNG's state as tensors and numbers (torch.load(weights_only=True) reads no numpy arrays)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _append_metrics(path: Path, entry: dict) -> None:
    """One line a log step, appended (a live log: rewriting it atomically each time would cost the square
    of its length); a kill can leave a torn last line, which the readers skip."""
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError as err:
        raise write_error(path, err, resume="re-run the same command to resume from the last checkpoint") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        write_text(path, "".join(json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= step))


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl as a list of dicts: step, tokens, loss, mse, auxk_loss, l0, frac_variance_explained,
    dead, threshold, lr, k, tokens_per_s. A torn last line (a kill while it was appended) is left out."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise WorkbenchError(f"{path} line {i + 1} is not JSON; delete the file (it is only the training log)") from None
        if not isinstance(row, dict) or "step" not in row:
            raise WorkbenchError(f"{path} line {i + 1} is not a training log entry; delete the file (it is only the training log)")
        rows.append(row)
    return rows


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """The training curves (loss, variance explained, L0, dead latents, threshold, lr) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    if not rows:
        return
    tokens = [r["tokens"] for r in rows]
    panels = [("loss", "loss", True), ("frac_variance_explained", "variance explained", False),
              ("l0", "L0 (training)", False), ("dead", "dead latents", False),
              ("threshold", "threshold (normalised units)", False), ("lr", "learning rate", False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, label, log_y) in zip(axes.flat, panels, strict=True):
        values = [r[key] for r in rows]
        if key == "threshold":  # -1 until the EMA starts
            values = [v if v >= 0 else float("nan") for v in values]
        ax.plot(tokens, values, lw=1)
        if key == "frac_variance_explained":  # the first steps' large negative values would flatten the curve
            ax.set_ylim(max(min(values), -0.1), 1.0)
        if key == "l0":
            ax.plot(tokens, [r["k"] for r in rows], lw=1, ls="--", label="k")
            ax.legend()
        if log_y:
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_atomic(png_path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    finally:
        plt.close(fig)
