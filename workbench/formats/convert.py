"""Format detection and exact conversion between dictionary_learning and SAELens SAE folders.

    convert("saes/resid_post_layer_2/trainer_0", to="saelens", out="export/blocks.2.hook_resid_post")

Every conversion reads the source into the format-neutral `SAEWeights` and writes it in the target
format; tensors are copied, never recomputed, unless the target cannot hold a setting, which is then
folded exactly (see `write_weights` in each format module). Supported:

    dictionary_learning BatchTopKSAE, MatryoshkaBatchTopKSAE  <->  SAELens jumprelu (constant threshold;
                                                                k and Matryoshka widths in metadata)
    dictionary_learning JumpReluAutoEncoder                   <->  SAELens jumprelu (per-latent threshold)
    dictionary_learning AutoEncoderTopK                       <->  SAELens topk
    dictionary_learning AutoEncoder                           <->  SAELens standard
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.weights import InferenceSAE, SAEWeights

FORMATS = ("dictionary_learning", "saelens")
OWN_FILES = {"dictionary_learning": (dl.AE_FILE, dl.CONFIG_FILE), "saelens": (saelens.CFG_FILE, saelens.WEIGHTS_FILE)}


def detect_format(folder: str | Path) -> str:
    """'dictionary_learning' (ae.pt + config.json) or 'saelens' (cfg.json + sae_weights.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is not a directory; give an SAE folder")
    found = [fmt for fmt, files in (("dictionary_learning", (dl.AE_FILE, dl.CONFIG_FILE)),
                                    ("saelens", (saelens.CFG_FILE, saelens.WEIGHTS_FILE)))
             if all((folder / f).is_file() for f in files)]
    if len(found) != 1:
        what = "both formats' files" if found else "neither ae.pt + config.json nor cfg.json + sae_weights.safetensors"
        raise WorkbenchError(f"{folder} holds {what}; give one SAE folder in one format")
    return found[0]


def read_weights(folder: str | Path, k: int | None = None) -> SAEWeights:
    """Any supported SAE folder as SAEWeights; `k` supplies (or must equal) a BatchTopK SAE's k."""
    folder = Path(folder)
    fmt = detect_format(folder)
    weights = dl.read_weights(folder) if fmt == "dictionary_learning" else saelens.read_weights(folder)
    if k is not None:
        if weights.k is not None and weights.k != k:
            raise WorkbenchError(f"{folder} records k={weights.k}; --k {k} contradicts it")
        weights.k = k
    return weights


def convert(src: str | Path, to: str, out: str | Path, k: int | None = None) -> str:
    """Convert one SAE folder into format `to` at `out`; returns what was written (e.g. 'BatchTopKSAE')."""
    if to not in FORMATS:
        raise WorkbenchError(f"--to must be one of {', '.join(FORMATS)} (got {to!r})")
    src, out = Path(src), Path(out)
    if detect_format(src) == to:
        raise WorkbenchError(f"{src} is already a {to} folder; copy it instead")
    if out.resolve() == src.resolve():
        raise WorkbenchError(f"--out {out} is the source folder; choose another directory")
    stale = [name for name in (dl.AE_FILE, dl.CONFIG_FILE, saelens.CFG_FILE, saelens.WEIGHTS_FILE)
             if (out / name).is_file() and name not in (OWN_FILES[to])]
    if stale:
        raise WorkbenchError(f"--out {out} already holds {', '.join(stale)} (an SAE in another format); choose an empty folder")
    weights = read_weights(src, k=k)
    return dl.write_weights(weights, out) if to == "dictionary_learning" else saelens.write_weights(weights, out)


def load_sae(folder: str | Path) -> nn.Module:
    """The workbench's own inference module for an SAE folder, with `encode` and `decode`: the trainable
    BatchTopKSAE / MatryoshkaBatchTopKSAE for those dictionary_learning classes, else InferenceSAE."""
    folder = Path(folder)
    if detect_format(folder) == "dictionary_learning":
        dict_class = dl.read_config(folder)["trainer"]["dict_class"]
        if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            return dl.load_folder(folder)[0].eval()
    return InferenceSAE(read_weights(folder)).eval()
