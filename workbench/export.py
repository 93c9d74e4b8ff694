"""`workbench export RUN_DIR --to {dictionary_learning,saelens} --out DIR`: every SAE of a training run.

A training run is `<train.out>/resid_post_layer_<L>/<name>/{ae.pt, config.json, eval_results.json}`.

    dictionary_learning  DIR/<series>/resid_post_layer_<L>/<name>/{ae.pt, config.json, eval_results.json}
                         (the published series' layout; files copied byte for byte)
    saelens              DIR/blocks.<L>.hook_resid_post/ (one SAE a layer) or
                         DIR/blocks.<L>.hook_resid_post/<name>/ (several), each with cfg.json,
                         sae_weights.safetensors and, when `workbench threshold` measured firing
                         rates, sparsity.safetensors

and DIR/README.md, the model card. An SAE whose threshold was never set (-1: it would run as a dense
ReLU SAE) is refused unless allow_uncalibrated. DIR must be new, empty, or an earlier export of the
same run to the same format (then it is rewritten, and what this export no longer writes is deleted:
see formats/output.py), so an export folder never mixes two runs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from workbench.cache.layout import Manifest
from workbench.errors import WorkbenchError
from workbench.files import write_atomic, write_text
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import find_sae_folders
from workbench.formats.output import is_current, write_output
from workbench.formats.weights import hook_name
from workbench.model_card import ExportedSAE, render_model_card
from workbench.sae.registry import BY_DICT_CLASS, MATRYOSHKA

TARGETS = ("dictionary_learning", "saelens")
CARD_FILE = "README.md"
DL_FILES = (dl.AE_FILE, dl.CONFIG_FILE, dl.EVAL_FILE)  # what a published dictionary_learning series folder holds
COPY_CHUNK = 16 << 20


def find_run_saes(run_dir: str | Path) -> list[Path]:
    """The dictionary_learning SAE folders of a run (ae.pt + config.json), by layer then name."""
    folders = find_sae_folders(run_dir, formats=("dictionary_learning",))

    def key(folder: Path) -> tuple:
        layer = dl.read_config(folder)["trainer"].get("layer")
        return (layer if layer is not None else -1, folder.name, str(folder))

    return sorted(folders, key=key)


def export_run(run_dir: str | Path, to: str, out: str | Path, allow_uncalibrated: bool = False,
               series_name: str | None = None) -> list[ExportedSAE]:
    """Export every SAE under run_dir to format `to` under `out`, plus the model card `out/README.md`.

    Every SAE is read and checked before anything is written; `out` is claimed as
    `formats.output.write_output` says (new, empty, or an earlier export of this run to this format,
    which is rewritten and loses the files this export no longer writes)."""
    if to not in TARGETS:
        raise WorkbenchError(f"--to must be one of {', '.join(TARGETS)} (got {to!r})")
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve() or out.resolve().is_relative_to(run_dir.resolve()):
        raise WorkbenchError(f"--out {out} is inside the run {run_dir}; export to a folder outside it")
    folders = find_run_saes(run_dir)
    sources = [_describe(folder) for folder in folders]
    no_layer = [str(f) for f, s in zip(folders, sources, strict=True) if s["layer"] is None]
    if no_layer:
        raise WorkbenchError(f"{', '.join(no_layer)}: config.json records no trainer.layer, which names the SAE in an "
                             "export; set it to the SAE's layer")
    uncalibrated = [str(f) for f, s in zip(folders, sources, strict=True) if s["threshold"] is not None and s["threshold"] < 0]
    if uncalibrated and not allow_uncalibrated:
        raise WorkbenchError(f"{len(uncalibrated)} SAE(s) have no JumpReLU threshold (-1, they would run as dense ReLU "
                             f"SAEs): {', '.join(uncalibrated)}; run `workbench threshold FOLDER` on each, or pass "
                             "--allow-uncalibrated")
    series = series_name or default_series_name(sources[0]["model"],
                                                all(BY_DICT_CLASS.get(s["dict_class"]) is MATRYOSHKA for s in sources))
    per_layer: dict[int | None, int] = {}
    for s in sources:
        per_layer[s["layer"]] = per_layer.get(s["layer"], 0) + 1
    ids: dict[str, Path] = {}
    files = [CARD_FILE]
    exported = []
    for folder, s in zip(folders, sources, strict=True):
        sae_id = export_id(to, series, s["layer"], folder.name, several_in_layer=per_layer[s["layer"]] > 1)
        if sae_id in ids:
            raise WorkbenchError(f"{ids[sae_id]} and {folder} would both export to {out / sae_id} (same layer and folder "
                                 "name); rename one of the folders")
        ids[sae_id] = folder
        names = ([n for n in DL_FILES if (folder / n).is_file()] if to == "dictionary_learning"
                 else saelens.folder_files(s["weights"]))
        files += [f"{sae_id}/{n}" for n in names]
        exported.append(ExportedSAE(source=folder, folder=out / sae_id, sae_id=sae_id, name=folder.name, layer=s["layer"],
                                    dict_class=s["dict_class"], width=s["width"], k=s["k"], group_sizes=s["group_sizes"],
                                    threshold=s["threshold"], threshold_method=s["threshold_method"],
                                    l0=s["l0"], fve=s["fve"], frac_recovered=s["frac_recovered"],
                                    kl_div=s["kl_div"]))
    first = sources[0]["weights"].info
    card = render_model_card(exported, to, series, first.model_name, first.provenance)
    return write_output(out, run_dir, "export", to, files, lambda: _write_all(exported, sources, to, out, card))


def is_exported(run_dir: str | Path, to: str, out: str | Path) -> bool:
    """Whether `out` holds the current export of the run in format `to` (formats.output.is_current: every
    file there, written after the run's SAE files last changed)."""
    inputs = run_inputs(run_dir)
    return bool(inputs) and is_current(Path(out), Path(run_dir), "export", to, inputs)


def run_inputs(run_dir: str | Path) -> list[Path]:
    """The files of a run's SAEs that what is made from them (exports, feature pages) depends on."""
    return [folder / name for folder in find_run_saes(run_dir)
            for name in (*DL_FILES, dl.SPARSITY_FILE) if (folder / name).is_file()]


def _write_all(exported: list[ExportedSAE], sources: list[dict], to: str, out: Path, card: str) -> list[ExportedSAE]:
    for e, s in zip(exported, sources, strict=True):
        if to == "dictionary_learning":
            for name in DL_FILES:
                if (e.source / name).is_file():
                    _copy(e.source / name, e.folder / name)
        else:
            weights = s["weights"]
            if weights.info.prepend_bos is None:
                provenance = weights.info.provenance
                weights.info.prepend_bos = _prepend_bos(provenance.cache if provenance is not None else None)
            saelens.write_weights(weights, e.folder)
    write_text(out / CARD_FILE, card)
    return exported


def _copy(src: Path, dst: Path) -> None:
    """Copy a file byte for byte, atomically (a failed copy leaves no partial file under dst's name)."""
    try:
        fh_src = open(src, "rb")
    except OSError as err:
        raise WorkbenchError(f"cannot read {src}: {err.strerror}; check the run folder") from None
    with fh_src:
        write_atomic(dst, lambda fh: shutil.copyfileobj(fh_src, fh, COPY_CHUNK))


def _describe(folder: Path) -> dict:
    """What the export and the model card need from one SAE folder, checked (dl.read_weights, the matrices
    memory-mapped, not read)."""
    config = dl.read_config(folder)
    trainer = config["trainer"]
    weights = dl.read_weights(folder)
    # Only the BatchTopK classes have a scalar JumpReLU threshold, -1 until calibrated.
    threshold = weights.constant_threshold() if trainer["dict_class"] in BY_DICT_CLASS else None
    evals = weights.info.eval_results or {}
    history = weights.info.provenance.threshold if weights.info.provenance is not None else None
    return {"weights": weights, "layer": trainer.get("layer"), "model": trainer.get("lm_name"),
            "dict_class": trainer["dict_class"], "width": weights.dict_size, "k": weights.k,
            "group_sizes": weights.group_sizes, "threshold": threshold,
            "threshold_method": history.method if history is not None else "ema" if threshold is not None and threshold >= 0 else None,
            "l0": evals.get("l0"), "fve": evals.get("frac_variance_explained"),
            "frac_recovered": evals.get("frac_recovered"), "kl_div": evals.get("kl_div")}


def default_series_name(model_name: str | None, all_matryoshka: bool) -> str:
    """The dictionary_learning series folder, as the published series are named: saes_<model, characters
    other than word characters, . and - as _>_<matryoshka_batch_top_k when every SAE is Matryoshka, else
    batch_top_k>."""
    model = re.sub(r"[^\w.-]", "_", model_name or "model")
    return f"saes_{model}_{'matryoshka_batch_top_k' if all_matryoshka else 'batch_top_k'}"


def export_id(to: str, series: str, layer: int | None, name: str, several_in_layer: bool) -> str:
    """An SAE's path inside an export folder: dictionary_learning <series>/resid_post_layer_<L>/<name> (the
    published series' layout); SAELens the SAE id blocks.<L>.hook_resid_post, with /<name> appended when
    its layer has several SAEs."""
    if to == "dictionary_learning":
        return f"{series}/{dl.resid_post_name(layer)}/{name}"
    hook = hook_name(layer)
    return f"{hook}/{name}" if several_in_layer else hook


def _prepend_bos(cache: str | None) -> bool | None:
    """SAELens' prepend_bos: whether the collected rows began with a BOS token (Qwen has none)."""
    if not cache:
        return None
    try:
        manifest = Manifest.read(Path(cache))
    except WorkbenchError:
        return None
    return None if manifest is None else manifest.data.get("bos_token_id") is not None
