"""`workbench status RECIPE|RUN`: where a pipeline stands, from its files, while it runs and after.

For a recipe, each stage is judged by the pipeline's own check (`pipeline.is_done`):

    done          its outputs are there and current
    running       a process holds its lock (collect.out's for collect, train.out's for train, and for the
                  per-SAE stages <train.out>/.stage's, whose holder names the stage)
    stopped       it has partial outputs (shards, a checkpoint) and nothing holds the lock: re-run to resume
    failed        the last run ended in it with the error shown (pipeline.json's `failed` entry)
    not started   none of the above

with the shards written of those expected, each layer's checkpoint step of its planned steps, an ETA
while it runs (from the shards' times, and training's tokens/s in metrics.jsonl), and the disk used by
the cache, the run and the export. Nothing is written or locked: the lock is probed with a shared
non-blocking flock, released at once. For a run folder (train.out) without its recipe, what its own files say: the
logged stages, the lock, each layer's checkpoint step.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError


@dataclass
class StageStatus:
    stage: str
    state: str
    detail: str = ""


@dataclass
class Status:
    title: str
    stages: list[StageStatus]
    disk: dict[str, int]  # what -> bytes (cache, run, export)
    failed: dict | None = None
    layers: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # layer -> (step, planned steps)
    shards: tuple[int, int] | None = None  # (written, expected)

    def of(self, stage: str) -> StageStatus:
        return next(s for s in self.stages if s.stage == stage)


def lock_held(folder: str | Path) -> bool:
    """Whether a writer holds `folder`'s files.folder_lock: a shared non-blocking flock on its `.lock`
    fails while one does. Creates nothing; a lock taken is released at once."""
    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDONLY)
    except OSError:
        return False  # no lock file: no writer ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe got
    return False


def stage_running(run: str | Path) -> str | None:
    """The per-SAE stage a pipeline is running now in the run folder (train.out): the one its held
    <train.out>/.stage lock names."""
    from workbench.pipeline import STAGE_LOCK, STAGES

    folder = Path(run) / STAGE_LOCK
    if not lock_held(folder):
        return None
    try:
        holder = (folder / ".lock").read_text()
    except OSError:
        return None
    return next((stage for stage in STAGES if f"{stage} stage" in holder), None)


def disk_used(folder: str | Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walked (a temporary file renamed)
    return total


def status(target: str, overrides: list[str] | tuple[str, ...] = ()) -> Status:
    """The status of the pipeline of recipe file `target`, or of the run folder (train.out) `target`."""
    path = Path(target)
    if path.is_dir():
        if overrides:
            raise WorkbenchError(f"{target} is a run folder; overrides ({' '.join(overrides)}) go with a recipe")
        return _run_status(path)
    if not path.is_file():
        raise WorkbenchError(f"{target} is neither a recipe file nor a run folder (train.out); give one")
    from workbench.config import load_recipe

    return _recipe_status(load_recipe(target, overrides), target)


def _recipe_status(recipe, recipe_path: str) -> Status:
    from workbench.pipeline import STAGES, read_failure, read_log

    log, failed = read_log(recipe), read_failure(recipe)
    cache_dir = recipe.train.cache or recipe.collect.out
    st = Status(f"recipe {recipe_path}: cache {cache_dir}, run {recipe.train.out}", [],
                {"cache": disk_used(cache_dir), "run": disk_used(recipe.train.out), "export": disk_used(recipe.export.out)},
                failed)
    for stage in STAGES:
        if stage == "features" and recipe.features.out is None:
            st.stages.append(StageStatus(stage, "not asked for", "features.out is null"))
            continue
        detail, partial, running = "", False, False
        if stage == "collect":
            detail, partial = _collect_detail(recipe, st)
            running = lock_held(recipe.collect.out)
        elif stage == "train":
            running = lock_held(recipe.train.out)
            detail, partial = _train_detail(recipe, st, running)
        else:
            running = stage_running(recipe.train.out) == stage
        if running and stage not in ("collect", "train"):
            state = "running"  # before _done: a stage being redone can still look done from its old files
        elif _done(stage, recipe, log):
            state = "done"
            detail = detail or (f"logged {log[stage]['finished']}" if stage in log else "found from its files")
        elif running:
            state = "running"
        elif failed is not None and failed.get("stage") == stage:
            state = "failed"
        else:
            state = "stopped" if partial else "not started"
        st.stages.append(StageStatus(stage, state, detail))
    return st


def _done(stage: str, recipe, log: dict) -> bool:
    """pipeline.is_done, where a check that the pipeline runs only after the stages before it (export's,
    which needs the SAEs) reads an earlier stage's missing outputs as not done."""
    from workbench.pipeline import is_done

    try:
        return is_done(stage, recipe, {}, log)
    except WorkbenchError:
        return False


def _collect_detail(recipe, st: Status) -> tuple[str, bool]:
    """Shards written of those expected (and an ETA from their times), and whether any are there."""
    from workbench.cache.layout import Manifest, shard_is_complete, shard_name
    from workbench.data import num_rows

    out = Path(recipe.collect.out)
    try:
        manifest = Manifest.read(out)
    except WorkbenchError as err:
        return str(err), False
    if manifest is None or not manifest.is_cache:
        return "", False
    c = recipe.collect
    expected = (len(manifest.data["shards"]) if manifest.complete
                else math.ceil(num_rows(recipe.data) / (c.batch_size * c.shard_batches)))
    written = [out / shard_name(i) for i in range(expected) if shard_is_complete(out / shard_name(i))]
    st.shards = (len(written), expected)
    detail = f"{len(written)} of {expected} shards"
    if 2 <= len(written) < expected:
        times = sorted(p.stat().st_mtime for p in written)
        rate = (len(times) - 1) / max(times[-1] - times[0], 1e-9)  # shards per second, between the first and last
        detail += f", ETA {_clock((expected - len(written)) / rate - (time.time() - times[-1]))} if it runs"
    return detail, bool(written)


def _train_detail(recipe, st: Status, running: bool) -> tuple[str, bool]:
    """Each layer's step of its planned steps (from its checkpoint, or done), and whether any began."""
    from workbench.training.loop import (
        CHECKPOINT,
        METRICS,
        _is_complete,
        _read_checkpoint,
        layer_dir,
        layer_plans,
        read_metrics,
    )

    t, plans = recipe.train, layer_plans(recipe)
    if plans is None:
        return "waits for a complete cache", False
    parts, begun = [], False
    for layer, plan in plans.items():
        folder = layer_dir(t.out, layer)
        if all(_is_complete(folder / cfg.name, plan, t) for cfg in t.saes):
            st.layers[layer] = (plan.steps, plan.steps)
            parts.append(f"layer {layer}: done ({plan.steps} steps)")
            begun = True
            continue
        try:
            checkpoint = _read_checkpoint(folder / CHECKPOINT, plan, len(t.saes))
        except WorkbenchError as err:
            parts.append(f"layer {layer}: {err}")
            continue
        if checkpoint is None:
            parts.append(f"layer {layer}: no checkpoint yet (of {plan.steps} steps)")
            continue
        step, begun = int(checkpoint["step"]), True
        st.layers[layer] = (step, plan.steps)
        text = f"layer {layer}: step {step} of {plan.steps} (checkpoint)"
        metrics = folder / t.saes[0].name / METRICS
        rows = read_metrics(metrics) if running and metrics.is_file() else []
        if rows and rows[-1].get("tokens_per_s"):
            last = rows[-1]
            text += f", step {last['step']} logged, ETA {_clock((plan.steps - last['step']) * t.batch_size / last['tokens_per_s'])}"
        parts.append(text)
    return "; ".join(parts), begun


def _run_status(run: Path) -> Status:
    """A run folder alone: the stages its pipeline.json logs, the lock, each layer's checkpoint step."""
    import torch

    from workbench.files import read_json_object
    from workbench.pipeline import STAGES, STATE_FILE
    from workbench.training.loop import CHECKPOINT

    state = read_json_object(run / STATE_FILE, fix="delete it (it is a log: every stage checks its own outputs)") or {}
    log = state.get("stages") if isinstance(state.get("stages"), dict) else {}
    failed = state.get("failed") if isinstance(state.get("failed"), dict) else None
    st = Status(f"run {run} (give the recipe for the checks of every stage's files)", [], {"run": disk_used(run)}, failed)
    parts = []
    for path in sorted(run.glob(f"resid_post_layer_*/{CHECKPOINT}")):
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
        except Exception:  # noqa: BLE001 - a damaged or foreign checkpoint is reported, not raised
            parts.append(f"{path.parent.name}: unreadable checkpoint")
            continue
        layer = int(path.parent.name.rsplit("_", 1)[1])
        st.layers[layer] = (step, None)
        parts.append(f"layer {layer}: step {step} (checkpoint)")
    for stage in STAGES:
        if isinstance(log.get(stage), dict) and "finished" in log[stage]:
            st.stages.append(StageStatus(stage, "done", f"logged {log[stage]['finished']}"))
        elif (stage == "train" and lock_held(run)) or stage_running(run) == stage:
            st.stages.append(StageStatus(stage, "running", "; ".join(parts) if stage == "train" else ""))
        elif failed is not None and failed.get("stage") == stage:
            st.stages.append(StageStatus(stage, "failed"))
        else:
            st.stages.append(StageStatus(stage, "stopped" if stage == "train" and parts else "not logged",
                                         "; ".join(parts) if stage == "train" else ""))
    return st


def render(st: Status) -> str:
    lines = [st.title]
    lines += [f"  {s.stage:<10} {s.state:<13} {s.detail}".rstrip() for s in st.stages]
    lines.append("disk: " + ", ".join(f"{what} {_size(n)}" for what, n in st.disk.items()))
    if st.failed is not None:
        lines.append(f"last error: [{st.failed.get('stage')}] {st.failed.get('error')} ({st.failed.get('time')})")
    return "\n".join(lines)


def _size(n: int) -> str:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
