"""Experiment trackers (recipe section `tracking`), through Accelerate's tracking API: its
`TensorBoardTracker` and `WandBTracker` classes, started on the main process only.

    tracking: {log_with: [tensorboard, wandb], project: sae-workbench, run: demo}

Each layer's training is one tracker run, `<run>/layer_<L>`, as dictionary_learning and SAELens give each
training its own wandb run; its metrics are `<sae name>/<metric>` at the optimiser step (every log step:
loss, mse, auxk_loss, l0, frac_variance_explained, dead, dead_fraction, threshold, lr, k, tokens_per_s).
Collection is the run `<run>/collect`: one entry when a collection run ends (tokens/s, and per layer the
fraction of tokens dropped as sinks and as first tokens). Runs are separate, rather than one run with
layers as prefixes, because a wandb run's step must only grow and every layer counts its steps from 0.

Files: TensorBoard writes `<dir>/<project>/<run>/layer_<L>/events.out.tfevents.*`; wandb writes its run
folders under `<dir>/wandb/` (online, or offline with WANDB_MODE=offline). A resumed layer reopens its
TensorBoard run with purge_step just after the checkpoint, so the steps logged after the checkpoint by the
killed run are replaced, not doubled; wandb starts a new run for the resumed part.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from workbench.config import Recipe
from workbench.errors import WorkbenchError

EXTRA_OF = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs (and the extra)


class Log(Protocol):
    def __call__(self, values: dict[str, float], step: int) -> None: ...


def check_trackers(recipe: Recipe) -> None:
    """Refuse, before any work, a tracker whose package is missing (Accelerate would silently skip it)."""
    for name in recipe.tracking.log_with:
        try:
            importlib.import_module(EXTRA_OF[name])
        except ImportError:
            raise WorkbenchError(f"tracking.log_with asks for {name}, which is not installed; install the extra: "
                                 f"pip install 'sae-workbench[{name}]' (or remove {name} from tracking.log_with)") from None


def tracker_dir(recipe: Recipe) -> Path:
    """Where the trackers write their local files: tracking.dir, or <train.out>/trackers."""
    return Path(recipe.tracking.dir) if recipe.tracking.dir is not None else Path(recipe.train.out) / "trackers"


def run_name(recipe: Recipe) -> str:
    """tracking.run, or the name of the folder that holds train.out."""
    return recipe.tracking.run or Path(recipe.train.out).resolve().parent.name or "workbench"


@contextmanager
def tracker_run(recipe: Recipe, part: str, config: dict, is_main: bool, resume_step: int = 0) -> Iterator[Log]:
    """One tracker run, `<run>/<part>`, open for the block: yields `log(values, step)`, which sends the
    values to every tracker of tracking.log_with. Off the main process, or with no tracker, it does nothing.
    config: the run's configuration (the recipe, as plain data). resume_step: the step a resumed run
    continues from (TensorBoard drops what the killed run logged after it)."""
    names = recipe.tracking.log_with if is_main else []
    if not names:
        yield lambda values, step: None
        return
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    name = f"{run_name(recipe)}/{part}"
    root = tracker_dir(recipe)
    trackers = []
    for tracker in names:
        if tracker == "tensorboard":
            # Steps are 1-based: the first step this run logs is resume_step + 1, and TensorBoard drops every
            # event of the folder's earlier runs from there on.
            trackers.append(TensorBoardTracker(f"{recipe.tracking.project}/{name}", root, purge_step=resume_step + 1))
        else:
            (root / "wandb").mkdir(parents=True, exist_ok=True)  # wandb writes <dir>/wandb/<run folder>
            trackers.append(WandBTracker(recipe.tracking.project, name=name, group=run_name(recipe), dir=str(root),
                                         config=config))
    try:
        for tracker in trackers:
            tracker.start()
            if tracker.name == "tensorboard":
                tracker.store_init_configuration(_flat(config))

        def log(values: dict[str, float], step: int) -> None:
            for tracker in trackers:
                tracker.log(values, step=step)

        yield log
    finally:
        for tracker in trackers:
            tracker.finish()


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested plain data as one level of `a.b.c` keys with int, float, str or bool values (TensorBoard's
    hparams take nothing else; lists and None are written as their text)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
