"""Format detection and exact conversion between dictionary_learning and SAELens SAE folders.

    convert("saes/resid_post_layer_2/trainer_0", to="saelens", out="export/blocks.2.hook_resid_post")

Every conversion reads the source into the format-neutral `SAEWeights` and writes it in the target
format; tensors are copied, never recomputed, unless the target cannot hold a setting, which is then
folded exactly (see `write_weights` in each format module). Supported:

    dictionary_learning BatchTopKSAE, MatryoshkaBatchTopKSAE  <->  SAELens jumprelu (constant threshold;
                                                                k and Matryoshka widths in metadata)
    dictionary_learning JumpReluAutoEncoder                   <->  SAELens jumprelu (per-latent threshold,
                                                                or a constant one with no k recorded)
    dictionary_learning AutoEncoderTopK                       <->  SAELens topk
    dictionary_learning AutoEncoder                           <->  SAELens standard

The output folder is claimed as `output.write_output` says: a new or empty folder, or the earlier
output of the same conversion (rewritten, with files it no longer writes deleted); anything else is
refused.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.output import write_output
from workbench.formats.weights import InferenceSAE, SAEWeights, check_k
from workbench.hub import resolve_sae_path
from workbench.sae import SAE
from workbench.sae.registry import BY_DICT_CLASS

FORMATS = ("dictionary_learning", "saelens")
OWN_FILES = {"dictionary_learning": (dl.AE_FILE, dl.CONFIG_FILE), "saelens": (saelens.CFG_FILE, saelens.WEIGHTS_FILE)}
WEIGHTS_FILE = {"dictionary_learning": dl.AE_FILE, "saelens": saelens.WEIGHTS_FILE}


def detect_format(folder: str | Path) -> str:
    """'dictionary_learning' (ae.pt + config.json) or 'saelens' (cfg.json + sae_weights.safetensors).
    Every function here takes a local folder or an hf:// reference (workbench.hub)."""
    folder = resolve_sae_path(folder)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is not a directory; give an SAE folder")
    found = [fmt for fmt, files in OWN_FILES.items() if all((folder / f).is_file() for f in files)]
    if len(found) == 1:
        return found[0]
    if found:
        raise WorkbenchError(f"{folder} holds both formats' files; give one SAE folder in one format")
    partial = [(fmt, [f for f in files if not (folder / f).is_file()]) for fmt, files in OWN_FILES.items()
               if any((folder / f).is_file() for f in files)]
    if partial:
        fmt, missing = partial[0]
        raise WorkbenchError(f"{folder} has {' and '.join(f for f in OWN_FILES[fmt] if f not in missing)} but no "
                             f"{' and no '.join(missing)}, so it is not a complete {fmt} SAE folder; copy the missing "
                             "file beside it or re-export the SAE")
    raise WorkbenchError(f"{folder} holds neither ae.pt + config.json nor cfg.json + sae_weights.safetensors; give one "
                         "SAE folder in one format")


def find_sae_folders(root: str | Path, formats: tuple[str, ...] = FORMATS, complete: bool = True) -> list[Path]:
    """Every SAE folder at or under root (root itself included) in one of `formats`, sorted by path.

    A folder counts when it holds its format's files (OWN_FILES); with complete=False, when it holds the
    weights file alone (ae.pt, sae_weights.safetensors), so that a checker can report what the folder lacks."""
    root = resolve_sae_path(root)
    if not root.is_dir():
        raise WorkbenchError(f"{root} is not a directory; give an SAE folder or a folder of them (train.out, an export)")
    folders = {p.parent for fmt in formats for p in root.rglob(WEIGHTS_FILE[fmt])
               if not complete or all((p.parent / f).is_file() for f in OWN_FILES[fmt])}
    if not folders:
        looked_for = " or ".join(" + ".join(OWN_FILES[fmt]) if complete else WEIGHTS_FILE[fmt] for fmt in formats)
        raise WorkbenchError(f"no SAE folder ({looked_for}) at or under {root}; give an SAE folder or a folder of them "
                             "(train.out, an export)")
    return sorted(folders)


def read_weights(folder: str | Path, k: int | None = None, k_name: str = "--k") -> SAEWeights:
    """Any supported SAE folder as SAEWeights; `k` supplies (or must equal) a BatchTopK SAE's training k,
    and must be from 1 to d_sae. k_name: where `k` came from, for errors."""
    folder = resolve_sae_path(folder)
    fmt = detect_format(folder)
    weights = dl.read_weights(folder) if fmt == "dictionary_learning" else saelens.read_weights(folder)
    if k is not None:
        if weights.k is not None and weights.k != k:
            raise WorkbenchError(f"{folder} records k={weights.k}; {k_name} {k} contradicts it")
        weights.k = check_k(k, weights.dict_size, k_name, "give the k the SAE was trained with")
    return weights


def convert(src: str | Path, to: str, out: str | Path, k: int | None = None) -> str:
    """Convert one SAE folder into format `to` at `out`; returns what was written (e.g. 'BatchTopKSAE')."""
    return convert_explained(src, to, out, k)[0]


def convert_explained(src: str | Path, to: str, out: str | Path, k: int | None = None) -> tuple[str, str]:
    """`convert`, returning what was written and why that class or architecture (for the CLI's line)."""
    if to not in FORMATS:
        raise WorkbenchError(f"--to must be one of {', '.join(FORMATS)} (got {to!r})")
    src, out = resolve_sae_path(src), Path(out)
    if detect_format(src) == to:
        raise WorkbenchError(f"{src} is already a {to} folder; copy it instead")
    if out.resolve() == src.resolve():
        raise WorkbenchError(f"--out {out} is the source folder; choose another directory")
    weights = read_weights(src, k=k)
    if k is not None and weights.activation != "topk" and weights.constant_threshold() is None:
        what = "per-latent JumpReLU thresholds" if weights.activation == "jumprelu" else "a plain ReLU activation"
        raise WorkbenchError(f"{src} has {what}, so a training k means nothing for it (--k is for an SAE with one "
                             "constant JumpReLU threshold); drop --k")
    if to == "dictionary_learning":
        (written, reason), files, write = dl.dict_class_for(weights), dl.folder_files(weights), dl.write_weights
    else:
        (written, reason), files, write = saelens.architecture_for(weights), saelens.folder_files(weights), saelens.write_weights
    write_output(out, src, "convert", to, files, lambda: write(weights, out))
    return written, reason


def load_trainable(folder: str | Path, k: int | None = None) -> SAE:
    """The trainable BatchTopKSAE / MatryoshkaBatchTopKSAE in an SAE folder of either format. A SAELens
    folder is converted exactly, in memory, as `convert` would write it (`k` supplies, or must equal, the
    training k of a jumprelu SAE with a constant threshold); a dictionary_learning one loads as it is."""
    folder = resolve_sae_path(folder)
    if detect_format(folder) == "dictionary_learning":
        return dl.load_folder(folder)[0]
    dict_class, state = dl.state_dict_for(read_weights(folder, k=k, k_name="the training k"))
    return dl.sae_from_state(dict_class, state, folder)


def load_sae(folder: str | Path) -> nn.Module:
    """The workbench's own inference module for an SAE folder, with `encode` and `decode`: the trainable
    BatchTopKSAE / MatryoshkaBatchTopKSAE for those dictionary_learning classes, else InferenceSAE."""
    folder = resolve_sae_path(folder)
    if detect_format(folder) == "dictionary_learning":
        dict_class = dl.read_config(folder)["trainer"]["dict_class"]
        if dict_class in BY_DICT_CLASS:
            return dl.load_folder(folder)[0].eval()
    return InferenceSAE(read_weights(folder)).eval()
