"""The SAELens 6.x folder format: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`).

Weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and for "jumprelu"
threshold [d_sae] (a vector). SAELens loads strictly and casts every tensor to cfg.dtype. cfg.json
nests everything about the SAE's use under `metadata` (model_name, hook_name, context_size,
prepend_bos, dataset_path), which SAELens only reads when metadata.sae_lens_version >= 6.

Architectures read: jumprelu, topk, standard. A BatchTopK / Matryoshka SAE is written as jumprelu
with its scalar threshold broadcast to [d_sae], and its k (and Matryoshka widths) in
metadata.training_architecture_details, where SAELens' own trainers record them; an SAE trained with
SAELens' algorithm (the workbench section's `algorithm: saelens`) gets the details save_inference_model
writes for it, every training-config field the jumprelu config lacks (`training_details`). The workbench's
extra section (sink filter and multiple, first-token removal, ...) goes to metadata.workbench, and
the dictionary_learning config of a converted SAE to metadata.converted_from, so converting back
restores it.

The weights file is written a block of rows at a time (safetensors is a JSON header followed by
raw little-endian tensor bytes), so a large SAE is never copied whole in memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workbench.config import SAELensTrainConfig, to_dict
from workbench.errors import WorkbenchError
from workbench.files import read_json_object, write_atomic, write_json
from workbench.formats.weights import (
    SPARSITY_FILE,
    FileRows,
    SAEInfo,
    SAEWeights,
    Source,
    check_k,
    check_shapes,
    check_sizes,
    contiguous_rows,
    dtype_of,
    hook_name,
    materialize,
    read_sparsity,
    row_blocks,
    shape_of,
    write_sparsity,
)
from workbench.provenance import Provenance
from workbench.sae.registry import holding

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the cfg.json format written (and the version the parity tests run)
HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int32: "I32", torch.int64: "I64"}
CFG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
              "torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16,
              "torch.float64": torch.float64}


# ---- one adapter per SAELens architecture ----

_TENSORS = {"W_enc": "DF", "W_dec": "FD", "b_enc": "F", "b_dec": "D"}  # weights.check_shapes dimensions


@dataclass(frozen=True)
class Reading:
    """What an architecture's reader sees: the SAEWeights built from the common tensors, and the cfg."""

    weights: SAEWeights
    cfg: dict
    details: dict  # metadata.training_architecture_details
    converted: dict  # metadata.converted_from
    cfg_path: Path
    lazy: Callable[[str], FileRows]  # a tensor of the weights file, read a block at a time


@dataclass(frozen=True)
class SAELensArch:
    """One SAELens architecture: its tensors, the workbench activation it is, what only it records in
    cfg.json (read into SAEWeights, and written from them)."""

    name: str
    activation: str  # SAEWeights.activation
    layout: dict[str, str]
    read: Callable[[Reading], None]
    write_cfg: Callable[[SAEWeights, dict, dict], None]  # (weights, cfg, cfg["metadata"])


def _read_jumprelu(r: Reading) -> None:
    weights, d_sae, cfg_path = r.weights, r.weights.dict_size, r.cfg_path
    weights.threshold_F = materialize(r.lazy("threshold"))
    if r.details.get("k") is not None:
        weights.k = check_k(r.details["k"], d_sae, f"{cfg_path}: metadata.training_architecture_details.k",
                            "fix it, or delete it and pass --k K")
    widths = r.details.get("matryoshka_widths")
    if widths:
        sizes = [b - a for a, b in zip([0, *widths[:-1]], widths, strict=True)] if _ints(widths) else []
        if not sizes or widths[-1] != d_sae or min(sizes) <= 0:
            raise WorkbenchError(f"{cfg_path}: matryoshka_widths {widths} are not increasing integers up to "
                                 f"d_sae={d_sae}; fix them or re-export the SAE")
        weights.group_sizes = sizes


def _cfg_jumprelu(weights: SAEWeights, cfg: dict, meta: dict) -> None:
    if weights.k is None:
        return
    # Where SAELens' BatchTopK / Matryoshka trainers record what the jumprelu file cannot hold.
    details = dict(meta.get("training_architecture_details") or {})
    if details.get("k") != weights.k:
        details["k"] = weights.k
    widths = torch.tensor(weights.group_sizes).cumsum(0).tolist() if weights.group_sizes else None
    if widths:
        details["matryoshka_widths"] = widths
    provenance = weights.info.provenance
    if weights.info.saelens_cfg is None and provenance is not None and provenance.algorithm == "saelens":
        details = training_details(weights.k, widths, provenance.saelens or {})
        meta["sae_lens_training_version"] = SAELENS_VERSION
        # What SAELens' trainer records at the end (set_final_sae_metadata): the training's mean L0 (here the batch
        # top-k's on held-out tokens, eval_results' l0_batch_topk) and the latents dead at the last step
        evals = weights.info.eval_results or {}
        if evals.get("l0_batch_topk") is not None:
            meta["l0"] = evals["l0_batch_topk"]
        if evals.get("dead_latents_training") is not None:
            meta["num_dead_features"] = evals["dead_latents_training"]
    meta.setdefault("training_architecture", holding(weights.group_sizes).saelens_architecture)
    meta["training_architecture_details"] = details


def training_details(k: int, widths: list[int] | None, settings: dict) -> dict:
    """metadata.training_architecture_details as SAELens 6.54.12's save_inference_model writes it for an SAE its
    BatchTopK (widths None) or Matryoshka BatchTopK training config trained: the training config's fields that
    the jumprelu inference config lacks, in its field order. `settings`: the train.saelens the SAE was trained
    with (the workbench section's `saelens`); use_sparse_activations (a memory layout, not the math) is False,
    SAELens' default."""
    s = to_dict(SAELensTrainConfig()) | settings
    details = {"decoder_init_norm": s["decoder_init_norm"], "k": k, "use_sparse_activations": False,
               "aux_loss_coefficient": s["aux_loss_coefficient"],
               "rescale_acts_by_decoder_norm": s["rescale_acts_by_decoder_norm"], "topk_threshold_lr": s["topk_threshold_lr"]}
    if widths is not None:
        details |= {"matryoshka_widths": widths, "use_matryoshka_aux_loss": s["use_matryoshka_aux_loss"]}
    return details


def _read_topk(r: Reading) -> None:
    weights, d_sae, cfg_path = r.weights, r.weights.dict_size, r.cfg_path
    k = r.cfg.get("k", (_object(cfg_path, r.cfg, "activation_fn_kwargs")).get("k"))
    if k is None:
        raise WorkbenchError(f"{cfg_path} has no k (a topk SAE keeps each token's k largest latents); add it or "
                             "re-export the SAE")
    weights.k = check_k(k, d_sae, f"{cfg_path}: k", "fix it or re-export the SAE")
    if r.converted.get("threshold") is not None:
        weights.threshold_F = torch.full((d_sae,), float(r.converted["threshold"]), dtype=torch.float32)


def _cfg_topk(weights: SAEWeights, cfg: dict, meta: dict) -> None:
    cfg.update(k=weights.k, rescale_acts_by_decoder_norm=weights.rescale_acts_by_decoder_norm)
    meta.pop("training_architecture", None)


def _nothing(*_: Any) -> None:
    """The standard (ReLU) architecture records nothing beyond the common keys."""


ARCHS = {a.name: a for a in (
    SAELensArch("jumprelu", "jumprelu", _TENSORS | {"threshold": "F"}, _read_jumprelu, _cfg_jumprelu),
    SAELensArch("topk", "topk", _TENSORS, _read_topk, _cfg_topk),
    SAELensArch("standard", "relu", _TENSORS, _nothing, _nothing),
)}


def read_weights(folder: str | Path) -> SAEWeights:
    """A SAELens folder as SAEWeights. The weight matrices are read lazily from the file, a block at a
    time; what SAELens would refuse to load, or what has no exact meaning outside SAELens (runtime
    normalisation, hook_z reshaping), is refused with the reason."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    cfg_path = folder / CFG_FILE
    # Pre-6.0 configs are flat and say topk through activation_fn (as SAELens' handle_pre_6_0_config reads them).
    activation_fn = cfg.get("activation_fn", "relu")
    arch = cfg.get("architecture") or ("topk" if activation_fn == "topk" else "standard")
    if activation_fn not in ("relu", "topk"):
        raise WorkbenchError(f"{folder}: activation_fn {activation_fn!r} has no dictionary_learning equivalent")
    if arch not in ARCHS:
        raise WorkbenchError(f"{folder}: SAELens architecture {arch!r} is not supported (supported: "
                             f"{', '.join(ARCHS)}); dictionary_learning has no class with its math")
    if cfg.get("normalize_activations", "none") != "none":
        raise WorkbenchError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} normalises inputs at run "
                             "time, which dictionary_learning cannot represent; fold the scaling into the weights in "
                             "SAELens (e.g. fold_activation_norm_scaling_factor) and save with 'none'")
    if cfg.get("reshape_activations", "none") != "none":
        raise WorkbenchError(f"{folder}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) has no "
                             "dictionary_learning equivalent")
    dtype = CFG_DTYPES.get(str(cfg.get("dtype", "float32")))
    if dtype is None:
        raise WorkbenchError(f"{cfg_path}: unknown dtype {cfg.get('dtype')!r} (known: float32, float16, bfloat16, "
                             "float64); fix it or re-export the SAE")
    flags = {key: cfg.get(key, default) for key, default in
             (("apply_b_dec_to_input", True), ("rescale_acts_by_decoder_norm", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise WorkbenchError(f"{cfg_path}: {key} is {value!r}, not true or false; fix it or re-export the SAE")
    meta = _object(cfg_path, cfg, "metadata")
    details = _object(cfg_path, meta, "training_architecture_details")
    path = folder / WEIGHTS_FILE
    shapes = _tensor_shapes(path)
    adapter = ARCHS[arch]
    layout = adapter.layout
    extra = set(shapes) - set(layout)
    if extra == {"scaling_factor"} and bool((load_file(str(path))["scaling_factor"] == 1).all()):
        extra = set()  # SAELens drops an all-ones scaling_factor
    if set(layout) - set(shapes) or extra:
        raise WorkbenchError(f"{path} does not hold a SAELens {arch} SAE (missing "
                             f"{sorted(set(layout) - set(shapes)) or 'none'}, unexpected {sorted(extra) or 'none'})")
    d_in, d_sae = check_shapes(path, shapes, layout)
    check_sizes(cfg_path, d_in, d_sae, {"d_in": (cfg.get("d_in"), "D"), "d_sae": (cfg.get("d_sae"), "F")}, required=True)

    def lazy(name: str) -> FileRows:
        return FileRows(path, name, shapes[name], dtype)

    info = _info(cfg_path, cfg, meta)
    weights = SAEWeights(
        W_enc_DF=lazy("W_enc"), b_enc_F=materialize(lazy("b_enc")), W_dec_FD=lazy("W_dec"),
        b_dec_D=materialize(lazy("b_dec")), activation=adapter.activation,
        apply_b_dec_to_input=flags["apply_b_dec_to_input"], info=info,
        rescale_acts_by_decoder_norm=flags["rescale_acts_by_decoder_norm"], sparsity_F=read_sparsity(folder, d_sae))
    adapter.read(Reading(weights, cfg, details, _object(cfg_path, meta, "converted_from"), cfg_path, lazy))
    return weights


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)


def _object(path: Path, parent: dict, key: str) -> dict:
    """parent[key] as a dict ({} when absent or null); any other JSON value is one WorkbenchError."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WorkbenchError(f"{path}: {key} is a JSON {type(value).__name__}, not an object; fix it or re-export the SAE")
    return value


def _info(path: Path, cfg: dict, meta: dict) -> SAEInfo:
    """What the SAE is for: 6.x nests it under metadata; older flat cfgs keep it at the top level."""

    def get(key: str) -> Any:
        return meta.get(key, cfg.get(key))

    hook = get("hook_name") or get("hook_point")
    if hook is not None and not isinstance(hook, str):
        raise WorkbenchError(f"{path}: hook_name {hook!r} is not a hook name; fix it or re-export the SAE")
    match = HOOK_RE.match(hook or "")
    converted = _object(path, meta, "converted_from")
    from_dl = converted.get("format") == "dictionary_learning"
    return SAEInfo(
        model_name=get("model_name"), layer=int(match.group(1)) if match else None, hook_name=hook,
        context_size=get("context_size"), dataset_path=get("dataset_path"), prepend_bos=get("prepend_bos"),
        provenance=Provenance.from_dict(meta.get("workbench"), f"{path} metadata"),
        # A folder converted from dictionary_learning carries that config home; an original SAELens
        # folder carries its own cfg, so a round trip restores whichever was the original.
        eval_results=converted.get("eval_results") if from_dl else None,
        dl_config=converted.get("config") if from_dl else None,
        saelens_cfg=None if from_dl else cfg)


def read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise WorkbenchError(f"{folder} is not a SAELens SAE folder (it needs {CFG_FILE} and {WEIGHTS_FILE})")
    return read_json_object(path, fix="fix or re-export it", missing_ok=False)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Validate a safetensors file (header, offsets, size) and return each tensor's shape."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise WorkbenchError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:200]}); re-download or re-export it") from None


def write_weights(weights: SAEWeights, folder: str | Path) -> str:
    """Write SAEWeights as a SAELens folder; returns the architecture written (jumprelu, topk or standard)."""
    folder = Path(folder)
    arch = architecture_for(weights)[0]
    tensors: dict[str, Source] = {"W_enc": weights.W_enc_DF, "W_dec": weights.W_dec_FD,
                                  "b_enc": weights.b_enc_F, "b_dec": weights.b_dec_D}
    if "threshold" in ARCHS[arch].layout:
        tensors["threshold"] = weights.threshold_F.to(weights.dtype).contiguous()
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    write_json(folder / CFG_FILE, _cfg_for(weights, arch), indent=None)
    if weights.sparsity_F is not None:
        write_sparsity(folder, weights.sparsity_F)
    return arch


def architecture_for(weights: SAEWeights) -> tuple[str, str]:
    """The SAELens architecture `write_weights` writes for these weights, and why."""
    if weights.activation == "topk":
        return "topk", f"top-k activation, k={weights.k}"
    if weights.activation == "relu":
        return "standard", "plain ReLU activation"
    constant = weights.constant_threshold()
    if constant is None:
        return "jumprelu", "per-latent JumpReLU thresholds"
    if weights.k is None:
        return "jumprelu", f"a JumpReLU threshold per latent (all {constant:g}); no training k recorded"
    return "jumprelu", (f"one JumpReLU threshold ({constant:g}) broadcast to every latent; training k={weights.k}"
                        + (" and the Matryoshka widths" if weights.group_sizes else "")
                        + " in metadata.training_architecture_details")


def folder_files(weights: SAEWeights) -> list[str]:
    """The files `write_weights` writes for these weights."""
    return [WEIGHTS_FILE, CFG_FILE] + ([SPARSITY_FILE] if weights.sparsity_F is not None else [])


def _cfg_for(weights: SAEWeights, arch: str) -> dict:
    """cfg.json as SAELens 6.54.12 writes it; the original one when the SAE came from SAELens with the
    same architecture (a round trip restores it)."""
    info = weights.info
    original = info.saelens_cfg or {}
    if original.get("architecture") == arch and (original.get("metadata") or {}).get("sae_lens_version"):
        cfg = json.loads(json.dumps(original))
    else:
        hook = info.hook_name or (hook_name(info.layer) if info.layer is not None else None)
        # SAELens' runner also records how its activations were made: seqpos_slice (1, None) is the workbench's
        # drop_first_token (the first position of every row left out), (None,) keeps every position
        drop_first = info.provenance is not None and info.provenance.drop_first_token
        cfg = {"d_in": None, "d_sae": None, "dtype": None, "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                            "model_name": info.model_name, "hook_name": hook, "hook_head_index": None,
                            "prepend_bos": True if info.prepend_bos is None else info.prepend_bos,
                            "context_size": info.context_size, "dataset_path": info.dataset_path,
                            "model_from_pretrained_kwargs": {}, "model_class_name": "HookedTransformer",
                            "seqpos_slice": [1, None] if drop_first else [None], "exclude_special_tokens": False},
               "architecture": arch}
    cfg.update(d_in=weights.activation_dim, d_sae=weights.dict_size, dtype=str(weights.dtype).removeprefix("torch."),
               apply_b_dec_to_input=weights.apply_b_dec_to_input)
    meta = cfg["metadata"]
    ARCHS[arch].write_cfg(weights, cfg, meta)
    if info.provenance is not None:
        meta["workbench"] = info.provenance.to_dict()
    if info.dl_config is not None:
        converted: dict[str, Any] = {"format": "dictionary_learning", "config": info.dl_config}
        if info.eval_results is not None:
            converted["eval_results"] = info.eval_results
        if ARCHS[arch].activation == "topk" and weights.constant_threshold() is not None:
            converted["threshold"] = weights.constant_threshold()  # AutoEncoderTopK's optional inference threshold
        meta["converted_from"] = converted
    return cfg


def write_safetensors(path: Path, tensors: dict[str, Source], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file streaming each tensor a block of rows at a time (lazy sources included).

    Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
    padded with spaces to a multiple of 8, then the tensors' bytes back to back in header order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, src in tensors.items():
        nbytes = dtype_of(src).itemsize * int(torch.Size(shape_of(src)).numel())
        header[name] = {"dtype": DTYPE_NAMES[dtype_of(src)], "shape": list(shape_of(src)), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(fh: BinaryIO) -> None:
        fh.write(struct.pack("<Q", len(header_bytes)))
        fh.write(header_bytes)
        for src in tensors.values():
            for start, stop in row_blocks(src):
                block = contiguous_rows(src, start, stop)
                fh.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))

    write_atomic(path, write)

