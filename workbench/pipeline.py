"""`workbench run RECIPE`: collect -> train -> threshold -> eval -> export (+ model card) -> verify.

Each stage answers "am I done for this recipe?" from its own files, so a deleted or damaged output is
redone and nothing finished is redone:

    collect    the cache's manifest is complete for this recipe and every shard is there, whole
    train      every SAE folder of train.saes is finished for its plan (config.json names it, ae.pt opens)
    threshold  every SAE is calibrated with threshold.method (config.json's workbench.threshold)
    eval       every SAE's eval_results.json holds `workbench eval`'s keys, and no threshold changed in this run
    export     each format's export folder lists every file it wrote, all there, newer than the SAEs
    verify     the log records a verification of the export folders as they are now
    features   features.out lists every page it wrote, all there, newer than the SAEs (or features.out is null)

Collection and training resume from their own shards and checkpoints. `<train.out>/pipeline.json` is a
log of what each stage did (and, for verify, of what it checked); deleting it loses nothing.

Under several processes (`accelerate launch`), collection and training run on every process; the per-SAE
stages run on the main process, which tells the others whether each stage is done and how it ended, so a
failure there ends every process with the same error instead of leaving them waiting at a barrier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from workbench.config import Recipe, fingerprint, to_dict
from workbench.errors import WorkbenchError
from workbench.files import folder_lock, read_json_object, write_json

STATE_FILE = "pipeline.json"
STAGE_LOCK = ".stage"  # <train.out>/.stage/.lock: held by the main process while a per-SAE stage runs
STAGES = ("collect", "train", "threshold", "eval", "export", "verify", "features")


def _state_path(recipe: Recipe) -> Path:
    return Path(recipe.train.out) / STATE_FILE


def _recipe_id(recipe: Recipe) -> str:
    return fingerprint({name: to_dict(getattr(recipe, name)) for name in ("model", "data", "collect", "train", "threshold", "export", "eval")})


def read_log(recipe: Recipe) -> dict:
    """The log's stage entries for this recipe ({} when none, or when the recipe changed)."""
    path = _state_path(recipe)
    fix = "delete it (it is a log: every stage checks its own outputs)"
    state = read_json_object(path, fix=fix) or {}
    stages = state.get("stages", {}) if state.get("recipe") == _recipe_id(recipe) else {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict) and "finished" in v for v in stages.values()):
        raise WorkbenchError(f"{path} does not record pipeline stages; {fix}")
    return stages


def _log(recipe: Recipe, stage: str, log: dict, info: dict) -> None:
    log[stage] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_json(_state_path(recipe), {"recipe": _recipe_id(recipe), "stages": log})


def _log_failure(recipe: Recipe, stage: str, log: dict, err: WorkbenchError) -> None:
    """Record the error beside the stage entries, for `workbench status`; the next finished stage's entry
    drops it. A failure to write the log must not hide the stage's own error."""
    failed = {"stage": stage, "error": str(err), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_json(_state_path(recipe), {"recipe": _recipe_id(recipe), "stages": log, "failed": failed})
    except WorkbenchError:
        pass


def read_failure(recipe: Recipe) -> dict | None:
    """The `failed` entry {stage, error, time} of the log, when the last run of this recipe ended with an error."""
    state = read_json_object(_state_path(recipe)) or {}
    failed = state.get("failed") if state.get("recipe") == _recipe_id(recipe) else None
    return failed if isinstance(failed, dict) else None


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
    calibrated = []
    for folder in _sae_folders(recipe):
        if calibrated_method(folder) == method:
            continue
        print(render(calibrate(folder, cache=recipe.train.cache or recipe.collect.out, method=method,
                               batch_size=recipe.threshold.batch_size, num_tokens=recipe.threshold.num_tokens,
                               device=recipe.collect.device)))
        calibrated.append(str(folder))
    return {"method": method, "calibrated": calibrated}


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
    return {"verified": report, "exports": _export_stamps(recipe)}


def stage_features(recipe: Recipe, recipe_path: str, overrides: list[str]) -> dict:
    from workbench.features import build_features

    f = recipe.features
    results = build_features(recipe.train.out, out=f.out, cache=recipe.train.cache or recipe.collect.out, top=f.top,
                             window=f.window, model=recipe.model if f.effects else None)
    print(f"feature pages of {len(results)} SAEs: open {Path(f.out) / 'index.html'}")
    return {"saes": len(results), "flagged": {str(r.folder): r.flagged for r in results}}


RUNNERS: dict[str, Callable[[Recipe, str, list[str]], dict]] = {
    "collect": stage_collect, "train": stage_train, "threshold": stage_threshold,
    "eval": stage_eval, "export": stage_export, "verify": stage_verify, "features": stage_features,
}


def _features_current(recipe: Recipe) -> bool:
    from workbench.export import run_inputs
    from workbench.formats.output import is_current

    inputs = run_inputs(recipe.train.out)
    return bool(inputs) and is_current(Path(recipe.features.out), Path(recipe.train.out), "features", "html", inputs)


def _export_stamps(recipe: Recipe) -> dict[str, int | None]:
    """Each export folder's marker mtime: what a verification checked."""
    from workbench.formats.output import MARKER

    stamps = {}
    for fmt in recipe.export.formats:
        marker = export_root(recipe, fmt) / MARKER
        stamps[fmt] = marker.stat().st_mtime_ns if marker.is_file() else None
    return stamps


def _every_sae(recipe: Recipe, finished: Callable[[Path], bool]) -> bool:
    try:
        folders = _sae_folders(recipe)
    except WorkbenchError:
        return False
    return bool(folders) and all(finished(folder) for folder in folders)


def _calibrated(recipe: Recipe, folder: Path) -> bool:
    from workbench.threshold import calibrated_method

    try:
        return calibrated_method(folder) == recipe.threshold.method
    except WorkbenchError:
        return False


def _evaluated(folder: Path) -> bool:
    from workbench.formats.dictionary_learning import EVAL_FILE

    try:
        results = read_json_object(folder / EVAL_FILE) or {}
    except WorkbenchError:
        return False
    return all(key in results for key in LM_KEYS)


LM_KEYS = ("frac_recovered", "kl_div")  # what `workbench eval` adds to eval_results.json


def is_done(stage: str, recipe: Recipe, ran: dict[str, dict], log: dict) -> bool:
    """Whether `stage` is finished for this recipe, from its own files (see the module docstring).
    ran: the stages this run has run so far, with what they returned; log: pipeline.json's entries."""
    if stage == "collect":
        from workbench.collect import is_collected

        return is_collected(recipe)
    if stage == "train":
        from workbench.collect import is_collected
        from workbench.training import is_trained

        return is_collected(recipe) and is_trained(recipe)
    if stage == "threshold":
        return _every_sae(recipe, lambda folder: _calibrated(recipe, folder))
    if stage == "eval":
        return not ran.get("threshold", {}).get("calibrated") and _every_sae(recipe, _evaluated)
    if stage == "export":
        from workbench.export import is_exported

        return all(is_exported(recipe.train.out, fmt, export_root(recipe, fmt)) for fmt in recipe.export.formats)
    if stage == "features":
        return _features_current(recipe)
    return "export" not in ran and "verify" in log and log["verify"].get("exports") == _export_stamps(recipe)


def run(recipe: Recipe, recipe_path: str, overrides: list[str], stages: tuple[str, ...] = STAGES,
        devices: tuple[str, str] | None = None) -> dict:
    """Run the pipeline's stages in order, skipping those already done for this recipe. Returns the log.
    With a bounded cache (collect.max_shards_on_disk) collection and training run at the same time, as two
    commands (see `stream_both`); devices: (collection's, training's) CUDA devices, e.g. ("0,1,2,3,4,5", "6,7")."""
    from workbench.dist import process_state

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise WorkbenchError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    state = process_state(cpu=recipe.collect.device == "cpu")
    log = read_log(recipe) if state.is_main_process else {}
    ran: dict[str, dict] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "features" and recipe.features.out is None:
            if state.is_main_process:
                print("[features] not asked for (features.out is null), skipped")
            continue
        # The main process decides, so that every process takes the same branch.
        done = _from_main(state, lambda stage=stage: is_done(stage, recipe, ran, log))
        if done:
            if state.is_main_process:
                when = f"logged {log[stage]['finished']}" if stage in log else "found from its files"
                print(f"[{stage}] already done ({when}), skipped")
            continue
        if state.is_main_process:
            print(f"[{stage}] ...", flush=True)
        try:
            if stage == "collect" and recipe.collect.max_shards_on_disk is not None and "train" in stages:
                if state.num_processes > 1:
                    raise WorkbenchError("with collect.max_shards_on_disk, start `workbench run` as one process: it launches "
                                         "collection and training itself (split the GPUs with --collect-devices and "
                                         "--train-devices)")
                info = stream_both(recipe_path, overrides, devices)
                ran["collect"] = info
                _log(recipe, "collect", log, info)
                stage, info = "train", {"saes": [str(p) for p in _sae_folders(recipe)]}
            elif stage in ("collect", "train"):  # on every process
                info = RUNNERS[stage](recipe, recipe_path, overrides)
                state.wait_for_everyone()
            else:  # on the main process; the others learn how it ended
                info = _on_main(state, stage, lambda stage=stage: run_stage_locked(
                    recipe, stage, lambda: RUNNERS[stage](recipe, recipe_path, overrides)))
        except WorkbenchError as err:
            if state.is_main_process:
                _log_failure(recipe, stage, log, err)
            raise
        ran[stage] = info
        if state.is_main_process:
            _log(recipe, stage, log, info)
    return log


def stream_both(recipe_path: str, overrides: list[str], devices: tuple[str, str] | None) -> dict:
    """Collection and training of a bounded cache at the same time: `workbench collect` and `workbench train`
    as two commands, each under its own `accelerate launch` when devices are given (collection on the first
    list of CUDA devices, training on the second), else as plain processes sharing this machine. The first to
    fail stops the other; both resume when the same command runs again."""
    children = {}
    for i, command in enumerate(("collect", "train")):
        env = dict(os.environ)
        argv = [sys.executable, "-m", "workbench", command, recipe_path, *overrides]
        if devices is not None:
            visible = devices[i]
            env["CUDA_VISIBLE_DEVICES"] = visible
            count = len(visible.split(","))
            argv = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if count > 1 else []),
                    "--num_processes", str(count), "-m", "workbench", command, recipe_path, *overrides]
        children[command] = subprocess.Popen(argv, env=env, start_new_session=True)
    failed = None
    try:
        while children and failed is None:
            for command, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                del children[command]
                if code != 0:
                    failed = (command, code)
            time.sleep(0.2)
    finally:
        for child in children.values():  # the other side of a failure, or of an interrupt
            os.killpg(child.pid, signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    if failed is not None:
        raise WorkbenchError(f"`workbench {failed[0]}` stopped (exit {failed[1]}), so the other side was stopped too; "
                             f"its error is above: fix it and run the same command again (both resume)")
    return {"streamed": True}


def run_stage_locked(recipe: Recipe, stage: str, work: Callable[[], dict]) -> dict:
    """A per-SAE stage (they write into the SAE folders, which no lock of collect's or train's covers) runs
    holding <train.out>/.stage/.lock, which names it: `workbench status` reports it running, and a second
    pipeline on the same run fails at once instead of writing the same files."""
    if not Path(recipe.train.out).is_dir():
        return work()  # no SAE folders to guard; the stage itself says what is missing (the lock would create it)
    with folder_lock(Path(recipe.train.out) / STAGE_LOCK, f"workbench run, {stage} stage"):
        return work()


def _from_main(state, decide: Callable[[], bool]) -> bool:
    """decide() on the main process, its answer on every process."""
    answer = decide() if state.is_main_process else None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        answer = broadcast_object_list([answer], from_process=0)[0]
    return bool(answer)


def _on_main(state, stage: str, work: Callable[[], dict]) -> dict:
    """work() on the main process. Every process returns when it ends; when it fails, every process
    raises: the main one its own error, the others a WorkbenchError with the same message."""
    outcome: list = [None]
    error: BaseException | None = None
    if state.is_main_process:
        try:
            outcome = [{"ok": work()}]
        except BaseException as err:  # noqa: BLE001 - passed on to the other processes, then raised again
            error = err
            text = str(err) if isinstance(err, WorkbenchError) else f"{type(err).__name__}: {err}"
            outcome = [{"error": text}]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list(outcome, from_process=0)
    if error is not None:
        raise error
    if "error" in outcome[0]:
        raise WorkbenchError(f"the main process failed in the {stage} stage: {outcome[0]['error']}")
    return outcome[0]["ok"]
