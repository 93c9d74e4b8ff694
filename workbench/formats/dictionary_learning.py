"""The dictionary_learning folder format: `ae.pt` (a torch.save'd state dict) + `config.json`.

`config.json` = {"trainer": {...}, "buffer": {...}, "workbench": {...}}: the trainer and buffer sections
have dictionary_learning's keys in its order (so its `load_dictionary` and SAELens' dictionary_learning
loader read them); the `workbench` section records what those libraries have no key for (the sink
filter and its multiple, first-token removal, the normalisation factor, k annealing, the cache).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.sae import SAE, BatchTopKSAE, MatryoshkaBatchTopKSAE

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"
EVAL_FILE = "eval_results.json"
EXTRA_SECTION = "workbench"

TRAINER_CLASS = {"BatchTopKSAE": "BatchTopKTrainer", "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer"}


def trainer_section(sae: SAE, *, lr: float, steps: int, auxk_alpha: float, warmup_steps: int,
                    decay_start: int | None, threshold_beta: float, threshold_start_step: int,
                    seed: int | None, device: str, layer: int, lm_name: str, submodule_name: str | None = None,
                    group_fractions: list[float] | None = None, group_weights: list[float] | None = None) -> dict:
    """dictionary_learning's trainer config, keys in its order (Matryoshka: group keys after dict_size)."""
    dict_class = type(sae).__name__
    out: dict[str, Any] = {
        "trainer_class": TRAINER_CLASS[dict_class], "dict_class": dict_class, "lr": lr, "steps": steps,
        "auxk_alpha": auxk_alpha, "warmup_steps": warmup_steps, "decay_start": decay_start,
        "threshold_beta": threshold_beta, "threshold_start_step": threshold_start_step,
        "top_k_aux": sae.activation_dim // 2, "seed": seed, "activation_dim": sae.activation_dim,
        "dict_size": sae.dict_size,
    }
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        out["group_fractions"] = group_fractions
        out["group_weights"] = group_weights
        out["group_sizes"] = sae.group_sizes.tolist()
    out.update({"k": int(sae.k), "device": device, "layer": layer, "lm_name": lm_name,
                "wandb_name": f"{dict_class}", "submodule_name": submodule_name or f"resid_post_layer_{layer}"})
    return out


def buffer_section(d_model: int, ctx_len: int, n_ctxs: int, refresh_batch_size: int, out_batch_size: int, device: str) -> dict:
    """dictionary_learning's buffer config (ActivationBuffer.config keys)."""
    return {"d_submodule": d_model, "io": "out", "n_ctxs": n_ctxs, "ctx_len": ctx_len,
            "refresh_batch_size": refresh_batch_size, "out_batch_size": out_batch_size, "device": device}


def save_folder(sae: SAE, folder: str | Path, config: dict, eval_results: dict | None = None) -> None:
    """Write ae.pt (CPU float tensors, state-dict contract) and config.json (indent 4), atomically each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}
    _atomic(folder / AE_FILE, lambda p: torch.save(state, p))
    _atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=4)))
    if eval_results is not None:
        _atomic(folder / EVAL_FILE, lambda p: p.write_text(json.dumps(eval_results, indent=4)))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WorkbenchError(f"cannot write {path}: {str(err).splitlines()[0]}; free space or choose another output directory") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused before it runs."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path} does not exist; give an SAE folder with ae.pt and config.json")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WorkbenchError(f"{path} is not a plain state dict and was refused unloaded (weights_only): "
                             f"{str(err).splitlines()[0][:200]}; only load checkpoints you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise WorkbenchError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:200]}); re-download or re-export it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError(f"{path} does not hold a state dict of tensors")
    return state


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WorkbenchError(f"{path} does not exist; a dictionary_learning SAE folder has ae.pt and config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WorkbenchError(f"{path} is not valid JSON ({err}); fix or re-export it") from None
    if "trainer" not in config or "dict_class" not in config["trainer"]:
        raise WorkbenchError(f"{path} has no trainer.dict_class; it is not a dictionary_learning config")
    return config


def load_folder(folder: str | Path) -> tuple[SAE, dict]:
    """Load a BatchTopKSAE / MatryoshkaBatchTopKSAE folder strictly, as dictionary_learning would."""
    folder = Path(folder)
    config = read_config(folder)
    state = load_state_dict(folder / AE_FILE)
    dict_class = config["trainer"]["dict_class"]
    k_cfg = config["trainer"].get("k")
    try:
        if dict_class == "BatchTopKSAE":
            dict_size, activation_dim = state["encoder.weight"].shape
            sae: SAE = BatchTopKSAE(activation_dim, dict_size, int(state["k"]))
        elif dict_class == "MatryoshkaBatchTopKSAE":
            activation_dim, dict_size = state["W_enc"].shape
            sae = MatryoshkaBatchTopKSAE(activation_dim, dict_size, int(state["k"]), state["group_sizes"].tolist())
        else:
            raise WorkbenchError(f"{folder}: dict_class {dict_class} is not a BatchTopK SAE; "
                                 "convert it with `workbench convert` or train a BatchTopK/Matryoshka SAE")
        if k_cfg is not None and int(k_cfg) != int(state["k"]):
            raise WorkbenchError(f"{folder}: config k={k_cfg} but ae.pt has k={int(state['k'])}; the folder is inconsistent")
        sae.load_state_dict(state, strict=True)
    except KeyError as err:
        raise WorkbenchError(f"{folder / AE_FILE} lacks tensor {err} for {dict_class}; it is not a {dict_class} state dict") from None
    except RuntimeError as err:
        raise WorkbenchError(f"{folder / AE_FILE} does not fit {dict_class}: {str(err).splitlines()[0]}") from None
    return sae, config
