"""The dictionary_learning folder format: `ae.pt` (a torch.save'd state dict) + `config.json`.

`config.json` = {"trainer": {...}, "buffer": {...}, "workbench": {...}}: the trainer and buffer sections
have dictionary_learning's keys in its order (so its `load_dictionary` and SAELens' dictionary_learning
loader read them); the `workbench` section records what those libraries have no key for (the sink
filter and its multiple, first-token removal, the normalisation factor, k annealing, the cache).

Two ways in: `load_folder` gives the workbench's trainable BatchTopK / Matryoshka module;
`read_weights` / `write_weights` map every supported class to and from the format-neutral
`SAEWeights` (conversion). The state dicts, as dictionary_learning 0.1.0 defines them:

    BatchTopKSAE, AutoEncoderTopK  b_dec [D], k [] int32, threshold [] f32, decoder.weight [D, F],
                                   encoder.weight [F, D], encoder.bias [F]
    MatryoshkaBatchTopKSAE         W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], k, threshold,
                                   group_sizes [n_groups] int64
    JumpReluAutoEncoder            W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]
                                   (never subtracts b_dec from the input: apply_b_dec_to_input is False)
    AutoEncoder                    bias [D] (= b_dec), encoder.weight [F, D], encoder.bias [F],
                                   decoder.weight [D, F] (columns renormalised by its loader)
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.files import read_json_object, write_atomic, write_json
from workbench.formats.weights import (
    SPARSITY_FILE,
    SAEInfo,
    SAEWeights,
    Scaled,
    check_dtypes,
    check_k,
    check_shapes,
    check_sizes,
    hook_name,
    materialize,
    materialize_T,
    read_sparsity,
    row_norms,
    vec_times,
    write_sparsity,
)
from workbench.provenance import Provenance
from workbench.sae import SAE
from workbench.sae.registry import BY_DICT_CLASS, architecture_of, holding

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"
EVAL_FILE = "eval_results.json"
EXTRA_SECTION = "workbench"


def resid_post_name(layer: int) -> str:
    """dictionary_learning's name for decoder layer `layer`'s output, resid_post_layer_<L>: the
    trainer's submodule_name and the layer's folder in a series."""
    return f"resid_post_layer_{layer}"


def trainer_section(sae: SAE, *, lr: float, steps: int, auxk_alpha: float, warmup_steps: int,
                    decay_start: int | None, threshold_beta: float, threshold_start_step: int,
                    seed: int | None, device: str, layer: int, lm_name: str, submodule_name: str | None = None,
                    group_fractions: list[float] | None = None, group_weights: list[float] | None = None) -> dict:
    """dictionary_learning's trainer config, keys in its order (Matryoshka: group keys after dict_size)."""
    arch = architecture_of(sae)
    dict_class = arch.dict_class
    out: dict[str, Any] = {
        "trainer_class": arch.trainer_class, "dict_class": dict_class, "lr": lr, "steps": steps,
        "auxk_alpha": auxk_alpha, "warmup_steps": warmup_steps, "decay_start": decay_start,
        "threshold_beta": threshold_beta, "threshold_start_step": threshold_start_step,
        "top_k_aux": sae.activation_dim // 2, "seed": seed, "activation_dim": sae.activation_dim,
        "dict_size": sae.dict_size,
    }
    if arch.grouped:
        out["group_fractions"] = group_fractions
        out["group_weights"] = group_weights
        out["group_sizes"] = sae.group_sizes.tolist()
    out.update({"k": int(sae.k), "device": device, "layer": layer, "lm_name": lm_name,
                "wandb_name": f"{dict_class}", "submodule_name": submodule_name or resid_post_name(layer)})
    return out


def buffer_section(d_model: int, ctx_len: int, n_ctxs: int, refresh_batch_size: int, out_batch_size: int, device: str) -> dict:
    """dictionary_learning's buffer config (ActivationBuffer.config keys)."""
    return {"d_submodule": d_model, "io": "out", "n_ctxs": n_ctxs, "ctx_len": ctx_len,
            "refresh_batch_size": refresh_batch_size, "out_batch_size": out_batch_size, "device": device}


def save_folder(sae: SAE, folder: str | Path, config: dict, eval_results: dict | None = None) -> None:
    """Write ae.pt (CPU float tensors, state-dict contract) and config.json (indent 4), atomically each."""
    folder = Path(folder)
    state = {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}
    write_atomic(folder / AE_FILE, lambda fh: torch.save(state, fh))
    write_json(folder / CONFIG_FILE, config, indent=4)
    if eval_results is not None:
        write_json(folder / EVAL_FILE, eval_results, indent=4)


def load_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused before it runs.

    mmap=True maps the tensors from the file instead of reading them (conversion of large SAEs);
    files in the legacy (non-zip) format are read normally."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path} does not exist; give an SAE folder with ae.pt and config.json")
    if path.stat().st_size == 0:
        raise WorkbenchError(f"{path} is empty; re-download or re-export it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise WorkbenchError(f"{path} was refused without running it: {_unpickler_reason(err)}; "
                             "only load checkpoints you trust") from None
    except Exception as err:  # damaged files surface as many error types from torch's zip and pickle readers
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:200]
        raise WorkbenchError(f"{path} is truncated or corrupt ({first}); re-download or re-export it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError(f"{path} does not hold a state dict of tensors")
    return state


def _unpickler_reason(err: Exception) -> str:
    """What torch's weights_only unpickler refused, in one line."""
    text = str(err)
    if "Unsupported global" in text:
        name = text.split("Unsupported global: ")[1].split(" was not")[0].removeprefix("GLOBAL ")
        return f"it is not a plain state dict of tensors (unpickling it would call {name})"
    return "it is not a PyTorch checkpoint of tensors (the weights-only unpickler cannot read it)"


def read_config(folder: str | Path) -> dict:
    """config.json, with the sections the workbench reads checked to be JSON objects."""
    path = Path(folder) / CONFIG_FILE
    config = read_json_object(path, fix="a dictionary_learning SAE folder has ae.pt and config.json: fix or re-export it",
                              missing_ok=False)
    if not isinstance(config.get("trainer"), dict) or not isinstance(config["trainer"].get("dict_class"), str):
        raise WorkbenchError(f"{path} has no trainer.dict_class; it is not a dictionary_learning config")
    for section in ("buffer", EXTRA_SECTION):
        if not isinstance(config.get(section) or {}, dict):
            raise WorkbenchError(f"{path}: {section} is a JSON {type(config[section]).__name__}, not an object; fix or "
                                 "re-export it")
    layer = config["trainer"].get("layer")
    if layer is not None and (type(layer) is not int or layer < 0):
        raise WorkbenchError(f"{path}: trainer.layer {layer!r} is not a layer number; fix or re-export it")
    return config


def load_folder(folder: str | Path) -> tuple[SAE, dict]:
    """Load a BatchTopKSAE / MatryoshkaBatchTopKSAE folder strictly, as dictionary_learning would."""
    folder = Path(folder)
    config, state = read_checked(folder, mmap=False)
    return sae_from_state(config["trainer"]["dict_class"], state, folder), config


def sae_from_state(dict_class: str, state: dict[str, torch.Tensor], folder: Path) -> SAE:
    """The trainable module for a checked BatchTopKSAE / MatryoshkaBatchTopKSAE state dict (ae.pt's keys:
    `read_checked`, or `state_dict_for`), loaded strictly; `folder` names the source in errors."""
    if dict_class not in BY_DICT_CLASS:
        raise WorkbenchError(f"{folder}: dict_class {dict_class} is not a BatchTopK SAE; "
                             "convert it with `workbench convert` or train a BatchTopK/Matryoshka SAE")
    return BY_DICT_CLASS[dict_class].module.from_state_dict(state)


# ---- conversion: every supported dictionary_learning class <-> SAEWeights ----

# One adapter per dictionary_learning class: ae.pt's keys with their dimensions, in torch.save order
# (weights.check_shapes: D = activation_dim, F = dict_size, G = the number of Matryoshka groups, "" = 0-d),
# its trainer's config keys in dictionary_learning's order (values a converted SAE cannot know are written
# as null), and the exact mapping each way between its state dict and SAEWeights.


@dataclass(frozen=True)
class Folded:
    """SAEWeights folded into what a dictionary_learning class can hold (state_dict_for)."""

    W_enc_DF: Any
    b_enc_F: torch.Tensor
    W_dec_FD: Any
    b_dec_D: torch.Tensor
    k: torch.Tensor  # int32 0-d (0 when unknown)
    threshold: torch.Tensor  # float32 0-d: the constant threshold, -1 for none
    weights: SAEWeights


@dataclass(frozen=True)
class DLClass:
    """One dictionary_learning class: its ae.pt layout, trainer config keys, and the two mappings."""

    name: str
    layout: dict[str, str]
    trainer_class: str
    trainer_keys: tuple[str, ...]
    subtracts_b_dec: bool  # encode(x) works on x - b_dec (SAELens' apply_b_dec_to_input)
    read: Callable[[dict[str, torch.Tensor], int], dict[str, Any]]  # (checked state, F) -> SAEWeights fields
    write: Callable[[Folded], dict[str, torch.Tensor]]  # -> the state dict, in torch.save order

    @property
    def dict_size_key(self) -> tuple[str, int]:
        """Which tensor and dimension give F."""
        return ("encoder.weight", 0) if "encoder.weight" in self.layout else ("W_enc", 1)


def _read_linear_topk(activation: str) -> Callable[[dict[str, torch.Tensor], int], dict[str, Any]]:
    def read(state: dict[str, torch.Tensor], F: int) -> dict[str, Any]:
        return dict(W_enc_DF=state["encoder.weight"].T, b_enc_F=state["encoder.bias"], W_dec_FD=state["decoder.weight"].T,
                    b_dec_D=state["b_dec"], activation=activation, threshold_F=state["threshold"].expand(F),
                    k=int(state["k"]))
    return read


def _write_linear_topk(f: Folded) -> dict[str, torch.Tensor]:
    return {"b_dec": f.b_dec_D, "k": f.k, "threshold": f.threshold, "decoder.weight": materialize_T(f.W_dec_FD),
            "encoder.weight": materialize_T(f.W_enc_DF), "encoder.bias": f.b_enc_F.clone()}


def _read_matryoshka(state: dict[str, torch.Tensor], F: int) -> dict[str, Any]:
    return dict(W_enc_DF=state["W_enc"], b_enc_F=state["b_enc"], W_dec_FD=state["W_dec"], b_dec_D=state["b_dec"],
                activation="jumprelu", threshold_F=state["threshold"].expand(F), k=int(state["k"]),
                group_sizes=state["group_sizes"].tolist())


def _write_matryoshka(f: Folded) -> dict[str, torch.Tensor]:
    return {"W_enc": materialize(f.W_enc_DF), "b_enc": f.b_enc_F.clone(), "W_dec": materialize(f.W_dec_FD),
            "b_dec": f.b_dec_D, "k": f.k, "threshold": f.threshold,
            "group_sizes": torch.tensor(f.weights.group_sizes, dtype=torch.int64)}


def _read_jumprelu(state: dict[str, torch.Tensor], F: int) -> dict[str, Any]:
    return dict(W_enc_DF=state["W_enc"], b_enc_F=state["b_enc"], W_dec_FD=state["W_dec"], b_dec_D=state["b_dec"],
                activation="jumprelu", threshold_F=state["threshold"], apply_b_dec_to_input=False)


def _write_jumprelu(f: Folded) -> dict[str, torch.Tensor]:
    return {"W_enc": materialize(f.W_enc_DF), "b_enc": f.b_enc_F.clone(), "W_dec": materialize(f.W_dec_FD),
            "b_dec": f.b_dec_D, "threshold": f.weights.threshold_F.clone()}


def _read_relu(state: dict[str, torch.Tensor], F: int) -> dict[str, Any]:
    """AutoEncoder: its from_pretrained divides decoder columns by their norms (and scales the encoder
    to match) whenever they are not all 1, so that is the SAE its users get."""
    W_enc_DF, b_enc_F, W_dec_FD = state["encoder.weight"].T, state["encoder.bias"], state["decoder.weight"].T
    norms_F = row_norms(W_dec_FD)
    if not torch.allclose(norms_F, torch.ones_like(norms_F)):
        W_enc_DF, b_enc_F = Scaled(W_enc_DF, col_scale=norms_F), b_enc_F * norms_F
        W_dec_FD = Scaled(W_dec_FD, row_scale=1 / norms_F)
    return dict(W_enc_DF=W_enc_DF, b_enc_F=b_enc_F, W_dec_FD=W_dec_FD, b_dec_D=state["bias"], activation="relu")


def _write_relu(f: Folded) -> dict[str, torch.Tensor]:
    return {"bias": f.b_dec_D, "encoder.weight": materialize_T(f.W_enc_DF), "encoder.bias": f.b_enc_F.clone(),
            "decoder.weight": materialize_T(f.W_dec_FD)}


_TOPK_LAYOUT = {"b_dec": "D", "k": "", "threshold": "", "decoder.weight": "DF", "encoder.weight": "FD", "encoder.bias": "F"}
_TOPK_TRAINING = ("lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta", "threshold_start_step")
_USE = ("device", "layer", "lm_name", "wandb_name", "submodule_name")
CLASSES = {c.name: c for c in (
    DLClass("BatchTopKSAE", _TOPK_LAYOUT, "BatchTopKTrainer",
            (*_TOPK_TRAINING, "top_k_aux", "seed", "activation_dim", "dict_size", "k", *_USE),
            True, _read_linear_topk("jumprelu"), _write_linear_topk),
    DLClass("AutoEncoderTopK", _TOPK_LAYOUT, "TopKTrainer",
            (*_TOPK_TRAINING, "seed", "activation_dim", "dict_size", "k", *_USE),
            True, _read_linear_topk("topk"), _write_linear_topk),
    DLClass("MatryoshkaBatchTopKSAE",
            {"W_enc": "DF", "b_enc": "F", "W_dec": "FD", "b_dec": "D", "k": "", "threshold": "", "group_sizes": "G"},
            "MatryoshkaBatchTopKTrainer",
            (*_TOPK_TRAINING, "top_k_aux", "seed", "activation_dim", "dict_size", "group_fractions", "group_weights",
             "group_sizes", "k", *_USE),
            True, _read_matryoshka, _write_matryoshka),
    DLClass("JumpReluAutoEncoder", {"W_enc": "DF", "b_enc": "F", "W_dec": "FD", "b_dec": "D", "threshold": "F"},
            "JumpReluTrainer",
            ("lr", "steps", "seed", "activation_dim", "dict_size", *_USE, "bandwidth", "sparsity_penalty",
             "sparsity_warmup_steps", "target_l0"),
            False, _read_jumprelu, _write_jumprelu),
    DLClass("AutoEncoder", {"bias": "D", "encoder.weight": "FD", "encoder.bias": "F", "decoder.weight": "DF"},
            "StandardTrainer",
            ("activation_dim", "dict_size", "lr", "l1_penalty", "warmup_steps", "resample_steps",
             "sparsity_warmup_steps", "steps", "decay_start", "seed", *_USE),
            True, _read_relu, _write_relu),
)}


def read_weights(folder: str | Path, mmap: bool = True) -> SAEWeights:
    """Any supported dictionary_learning SAE folder as SAEWeights, with the semantics its
    `load_dictionary` gives (an AutoEncoder's decoder renormalised as its loader does). The weight
    matrices stay memory-mapped views (mmap=True) until a writer reads them."""
    folder = Path(folder)
    config, state = read_checked(folder, mmap=mmap)
    trainer = config["trainer"]
    dict_class = trainer["dict_class"]
    extra = dict(config.get(EXTRA_SECTION) or {})
    converted = extra.pop("converted_from", None) or {}
    provenance = Provenance.from_dict(extra, str(folder / CONFIG_FILE))
    info = SAEInfo(
        model_name=trainer.get("lm_name"), layer=trainer.get("layer"), context_size=(config.get("buffer") or {}).get("ctx_len"),
        dataset_path=provenance.dataset if provenance else None, provenance=provenance,
        eval_results=read_json_object(folder / EVAL_FILE, fix="fix or delete it"),
        # A folder converted from SAELens carries that cfg home; an original folder carries its own
        # config, so a round trip restores whichever was the original.
        dl_config=None if converted else {k: v for k, v in config.items() if k != EXTRA_SECTION},
        saelens_cfg=converted.get("cfg") if converted.get("format") == "saelens" else None)
    if info.layer is not None:
        info.hook_name = hook_name(info.layer)
    F = dict_size(dict_class, state)
    return SAEWeights(**CLASSES[dict_class].read(state, F), sparsity_F=read_sparsity(folder, F), info=info)


def read_checked(folder: Path, mmap: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and ae.pt, checked against each other as dictionary_learning's strict loader would
    need them: a supported class, exactly its tensors, shapes that agree (weights.check_shapes) with each
    other and with config.json's sizes (weights.check_sizes), one float dtype, and a k (and Matryoshka
    groups) that fit the dictionary. Every failure is one WorkbenchError naming the file."""
    config = read_config(folder)
    trainer = config["trainer"]
    dict_class = trainer["dict_class"]
    if dict_class not in CLASSES:
        raise WorkbenchError(f"{folder}: dict_class {dict_class} is not supported (supported: {', '.join(CLASSES)}); "
                             "it has no lossless mapping in the workbench")
    path = folder / AE_FILE
    state = load_state_dict(path, mmap=mmap)
    layout = CLASSES[dict_class].layout
    want, have = set(layout), set(state)
    if want != have:  # dictionary_learning loads strictly: the same keys, no more, no fewer
        missing, extra = sorted(want - have), sorted(have - want)
        raise WorkbenchError(f"{path} is not a {dict_class} state dict (missing {missing or 'none'}, "
                             f"unexpected {extra or 'none'}); check config.json's trainer.dict_class")
    D, F = check_shapes(path, {name: tuple(t.shape) for name, t in state.items()}, layout)
    check_sizes(folder / CONFIG_FILE, D, F, {"trainer.activation_dim": (trainer.get("activation_dim"), "D"),
                                             "trainer.dict_size": (trainer.get("dict_size"), "F"),
                                             "buffer.d_submodule": ((config.get("buffer") or {}).get("d_submodule"), "D")},
                required=False)
    check_dtypes(path, {name: state[name].dtype for name, dims in layout.items() if dims not in ("", "G")})
    if "k" in layout:
        k = check_k(state["k"].item(), F, f"{path}: k", "re-export it")
        if trainer.get("k") is not None and trainer["k"] != k:
            raise WorkbenchError(f"{folder}: config k={trainer['k']!r} but ae.pt has k={k}; the folder is inconsistent: "
                                 "fix trainer.k or re-export it")
    if "group_sizes" in layout:
        groups = state["group_sizes"].tolist()
        if state["group_sizes"].is_floating_point() or min(groups, default=0) <= 0 or sum(groups) != F:
            raise WorkbenchError(f"{path}: group_sizes {groups} are not positive integers summing to dict_size {F}; "
                                 "re-export it")
    return config, state


def dict_size(dict_class: str, state: dict[str, torch.Tensor]) -> int:
    """F of a checked state dict of `dict_class`."""
    name, dim = CLASSES[dict_class].dict_size_key
    return state[name].shape[dim]


def dict_class_for(weights: SAEWeights) -> tuple[str, str]:
    """The dictionary_learning class that represents these weights exactly, and why it is that one.

    A JumpReLU SAE with one constant threshold is also a BatchTopKSAE (or, with group sizes, a
    MatryoshkaBatchTopKSAE), but only when its training k is known; without it, JumpReluAutoEncoder
    (a per-latent threshold that happens to be constant) holds the same SAE exactly."""
    if weights.activation == "topk":
        return "AutoEncoderTopK", f"top-k activation, k={weights.k}"
    if weights.activation == "relu":
        norms_F = row_norms(weights.W_dec_FD)
        if not weights.rescale_acts_by_decoder_norm and not torch.allclose(norms_F, torch.ones_like(norms_F)):
            raise WorkbenchError("dictionary_learning's AutoEncoder renormalises decoder rows to unit norm when it loads, "
                                 "which would rescale this SAE's latents; fold the decoder norms first "
                                 "(SAELens: sae.fold_W_dec_norm(), then save_model) and convert that")
        return "AutoEncoder", "plain ReLU activation with unit-norm decoder rows"
    constant = weights.constant_threshold()
    if constant is None:
        return "JumpReluAutoEncoder", "per-latent JumpReLU thresholds"
    if weights.k is None:
        return "JumpReluAutoEncoder", "no training k recorded (pass --k K for BatchTopKSAE)"
    dict_class = holding(weights.group_sizes).dict_class
    return dict_class, f"one JumpReLU threshold ({constant:g}) and training k={weights.k}"


def folder_files(weights: SAEWeights) -> list[str]:
    """The files `write_weights` writes for these weights."""
    files = [AE_FILE, CONFIG_FILE]
    if weights.info.eval_results is not None:
        files.append(EVAL_FILE)
    if weights.sparsity_F is not None:
        files.append(SPARSITY_FILE)
    return files


def write_weights(weights: SAEWeights, folder: str | Path) -> str:
    """Write SAEWeights as a dictionary_learning folder (`folder_files`: ae.pt from `state_dict_for`,
    config.json, and eval_results.json / sparsity.safetensors when known). Returns the dict_class written."""
    folder = Path(folder)
    dict_class, state = state_dict_for(weights)
    write_atomic(folder / AE_FILE, lambda fh: torch.save(state, fh))
    write_json(folder / CONFIG_FILE, _config_for(weights, dict_class), indent=4)
    if weights.info.eval_results is not None:
        write_json(folder / EVAL_FILE, weights.info.eval_results, indent=4)
    if weights.sparsity_F is not None:
        write_sparsity(folder, weights.sparsity_F)
    return dict_class


def state_dict_for(weights: SAEWeights) -> tuple[str, dict[str, torch.Tensor]]:
    """The dictionary_learning class that holds these weights exactly (`dict_class_for`) and its state dict.

    Differences the class cannot hold are folded exactly: apply_b_dec_to_input (b_enc + b_dec @ W_enc)
    and SAELens' rescale_acts_by_decoder_norm (decoder rows to unit norm, encoder scaled to match)."""
    dict_class = dict_class_for(weights)[0]
    W_enc_DF, b_enc_F, W_dec_FD = weights.W_enc_DF, weights.b_enc_F, weights.W_dec_FD
    adapter = CLASSES[dict_class]
    if weights.apply_b_dec_to_input != adapter.subtracts_b_dec:
        shift_F = vec_times(weights.b_dec_D, W_enc_DF)
        b_enc_F = b_enc_F + shift_F if adapter.subtracts_b_dec else b_enc_F - shift_F
    if weights.rescale_acts_by_decoder_norm:
        norms_F = row_norms(W_dec_FD)
        W_enc_DF, b_enc_F, W_dec_FD = Scaled(W_enc_DF, col_scale=norms_F), b_enc_F * norms_F, Scaled(W_dec_FD, row_scale=1 / norms_F)
    # AutoEncoderTopK's optional inference threshold rides along as a constant threshold_F.
    constant = weights.constant_threshold()
    folded = Folded(W_enc_DF=W_enc_DF, b_enc_F=b_enc_F, W_dec_FD=W_dec_FD, b_dec_D=weights.b_dec_D.clone(),
                    k=torch.tensor(weights.k or 0, dtype=torch.int32),
                    threshold=torch.tensor(-1.0 if constant is None else constant, dtype=torch.float32), weights=weights)
    return dict_class, adapter.write(folded)


def _config_for(weights: SAEWeights, dict_class: str) -> dict:
    """config.json: the original one when the SAE came from this class (a round trip restores it), else
    dictionary_learning's keys with what is known filled in and null for training details it never had."""
    info = weights.info
    original = info.dl_config or {}
    if original.get("trainer", {}).get("dict_class") == dict_class:
        config = json.loads(json.dumps(original))
    else:
        adapter = CLASSES[dict_class]
        trainer_class, keys = adapter.trainer_class, adapter.trainer_keys
        trainer: dict[str, Any] = {"trainer_class": trainer_class, "dict_class": dict_class, **dict.fromkeys(keys)}
        trainer.update(layer=info.layer, lm_name=info.model_name, wandb_name=dict_class,
                       submodule_name=resid_post_name(info.layer) if info.layer is not None else info.hook_name)
        buffer = {"d_submodule": weights.activation_dim, "io": "out", "n_ctxs": None, "ctx_len": info.context_size,
                  "refresh_batch_size": None, "out_batch_size": None, "device": "cpu"}
        config = {"trainer": trainer, "buffer": buffer}
    trainer = config["trainer"]
    trainer.update(activation_dim=weights.activation_dim, dict_size=weights.dict_size)
    if "k" in CLASSES[dict_class].layout:
        trainer["k"] = weights.k
    if "group_sizes" in CLASSES[dict_class].layout:
        trainer["group_sizes"] = list(weights.group_sizes or [])
    extra = info.provenance.to_dict() if info.provenance is not None else {}
    if info.saelens_cfg is not None:
        extra["converted_from"] = {"format": "saelens", "cfg": info.saelens_cfg}
    if extra:
        config[EXTRA_SECTION] = extra
    return config
