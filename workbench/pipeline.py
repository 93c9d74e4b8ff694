"""`workbench run RECIPE`: collect -> train -> threshold -> eval -> export (+ model card) -> verify.

Every stage is safe to run again: collection and training resume from their own shards and checkpoints,
the threshold stage skips SAEs already calibrated with the recipe's method, evaluation and export are
deterministic re-computations. `<train.out>/pipeline.json` records which stages finished for this recipe,
so re-running after a failure or a kill at any point continues with the first unfinished stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from workbench.config import Recipe, fingerprint, to_dict
from workbench.errors import WorkbenchError
from workbench.files import read_json_object, write_json

STATE_FILE = "pipeline.json"
STAGES = ("collect", "train", "threshold", "eval", "export", "verify")


def _state_path(recipe: Recipe) -> Path:
    return Path(recipe.train.out) / STATE_FILE


def _recipe_id(recipe: Recipe) -> str:
    return fingerprint({name: to_dict(getattr(recipe, name)) for name in ("model", "data", "collect", "train", "threshold", "export", "eval")})


def read_state(recipe: Recipe) -> dict:
    """The finished stages of this recipe's pipeline ({} when none, or when the recipe changed)."""
    path = _state_path(recipe)
    fix = "delete it (every stage then checks its own outputs again, and skips what is done)"
    state = read_json_object(path, fix=fix) or {}
    stages = state.get("stages", {}) if state.get("recipe") == _recipe_id(recipe) else {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict) and "finished" in v for v in stages.values()):
        raise WorkbenchError(f"{path} does not record pipeline stages; {fix}")
    return stages


def _mark_done(recipe: Recipe, stage: str, done: dict, info: dict) -> None:
    done[stage] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_json(_state_path(recipe), {"recipe": _recipe_id(recipe), "stages": done})


def export_root(recipe: Recipe, fmt: str) -> Path:
    return Path(recipe.export.out) / fmt


def stage_collect(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.collect import collect

    summary = collect(recipe)
    return {"tokens": summary.tokens}


def stage_train(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.training import train

    return {"saes": [str(p) for p in train(recipe)]}


def _sae_folders(recipe: Recipe) -> list[Path]:
    from workbench.export import find_run_saes

    return find_run_saes(recipe.train.out)


def stage_threshold(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.threshold import calibrate, calibrated_method, render

    method = recipe.threshold.method
    for folder in _sae_folders(recipe):
        if calibrated_method(folder) == method:
            continue
        print(render(calibrate(folder, cache=recipe.train.cache or recipe.collect.out, method=method,
                               batch_size=recipe.threshold.batch_size, num_tokens=recipe.threshold.num_tokens,
                               device=recipe.collect.device)))
    return {"method": method}


def stage_eval(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.evaluate import evaluate_folders, render

    results = evaluate_folders(recipe.train.out, recipe_path, overrides)
    for folder, res in results.items():
        print(f"{folder}\n{render(res)}")
    return {"frac_recovered": {f: r.get("frac_recovered") for f, r in results.items()}}


def stage_export(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.export import export_run

    out = {}
    for fmt in recipe.export.formats:
        exported = export_run(recipe.train.out, fmt, export_root(recipe, fmt),
                              allow_uncalibrated=recipe.export.allow_uncalibrated, series_name=recipe.export.series_name)
        out[fmt] = [str(e.folder) for e in exported]
        print(f"exported {len(exported)} SAEs as {fmt} to {export_root(recipe, fmt)}")
    return out


def stage_verify(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.verify import format_report, verify

    report = {}
    for fmt in recipe.export.formats:
        root = export_root(recipe, fmt)
        checks = verify(root, cache=recipe.train.cache or recipe.collect.out)
        print(format_report(checks, root))
        if not all(c.ok for c in checks):
            raise WorkbenchError(f"verification of {root} failed (see the table above); the exported SAEs do not "
                                 "match their reference library")
        report[fmt] = len(checks)
    return {"verified": report}


RUNNERS: dict[str, Callable[[Recipe, str, list[str]], dict]] = {
    "collect": stage_collect, "train": stage_train, "threshold": stage_threshold,
    "eval": stage_eval, "export": stage_export, "verify": stage_verify,
}


def run(recipe: Recipe, recipe_path: str, overrides: list[str], stages: tuple[str, ...] = STAGES) -> dict:
    """Run the pipeline's stages in order, skipping those this recipe already finished."""
    from workbench.dist import process_state

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise WorkbenchError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    state = process_state(cpu=recipe.collect.device == "cpu")
    done = read_state(recipe)
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage in done:
            if state.is_main_process:
                print(f"[{stage}] already done ({done[stage]['finished']}), skipped")
            continue
        if state.is_main_process:
            print(f"[{stage}] ...", flush=True)
        # Collection and training run on every process; the per-SAE stages run on the main one.
        if stage in ("collect", "train"):
            info = RUNNERS[stage](recipe, recipe_path, overrides)
        elif state.is_main_process:
            info = RUNNERS[stage](recipe, recipe_path, overrides)
        else:
            info = {}
        state.wait_for_everyone()
        if state.is_main_process:
            _mark_done(recipe, stage, done, info)
    return done
