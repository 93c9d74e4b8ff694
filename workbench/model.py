"""Loading a causal LM and capturing decoder-layer outputs (resid_post) in one forward pass.

`blocks.<L>.hook_resid_post` in TransformerLens terms is the output of decoder layer L. We hook the
layers themselves, never `output_hidden_states` (whose last entry is after the final norm), and stop
the forward once the deepest requested layer has run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.embedded import resolve_model_path
from workbench.errors import WorkbenchError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _model_path(cfg: ModelConfig) -> str:
    """model.name as something from_pretrained takes; a name that is a path must be a directory."""
    path = resolve_model_path(cfg.name)
    if path.startswith(("/", "./", "../", "~")) or Path(path).exists():
        if not Path(path).expanduser().is_dir():
            raise WorkbenchError(f"model.name {cfg.name} is not a directory; give a local directory saved with "
                                 "save_pretrained, or a hub id such as Qwen/Qwen3-8B")
        return str(Path(path).expanduser())
    return path


def load_config(cfg: ModelConfig):
    """The model's transformers config only (no weights): for checks before the weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_model_path(cfg), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as err:
        raise WorkbenchError(f"cannot load the config of model.name '{cfg.name}': {str(err).splitlines()[0]} "
                             "(give a hub id or a local directory saved with save_pretrained)") from None


def text_config(config):
    """The language model's part of a (possibly multimodal) model config: its text_config, else itself."""
    return getattr(config, "text_config", config)


def num_layers_of(config) -> int:
    """num_hidden_layers of a (possibly multimodal) model config."""
    return int(text_config(config).num_hidden_layers)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = _model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as err:
        raise WorkbenchError(f"cannot load the tokenizer of model.name '{cfg.name}': {str(err).splitlines()[0]} "
                             "(give a hub id or a local directory with tokenizer files)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model in eval mode on `device`, in cfg.dtype ('auto' keeps the checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM

    path = _model_path(cfg)
    dtype: Any = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except (OSError, ValueError) as err:
        raise WorkbenchError(f"cannot load model.name '{cfg.name}': {str(err).splitlines()[0]} "
                             "(give a hub id or a local directory saved with save_pretrained)") from None
    model.to(device).eval()
    model.requires_grad_(False)
    num_layers = len(decoder_layers(model))
    if cfg.num_layers is not None and cfg.num_layers != num_layers:
        raise WorkbenchError(f"model.num_layers is {cfg.num_layers} but {cfg.name} has {num_layers} layers; fix the recipe")
    if cfg.d_model is not None and cfg.d_model != d_model_of(model):
        raise WorkbenchError(f"model.d_model is {cfg.d_model} but {cfg.name} has hidden size {d_model_of(model)}; fix the recipe")
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with num_hidden_layers entries."""
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    for candidate in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: Any = model
        for part in candidate.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n):
            return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) == 1:
        return lists[0]
    raise WorkbenchError(f"cannot find the decoder layers of {type(model).__name__}; it is not a decoder stack this workbench knows")


def d_model_of(model_or_config: Any) -> int:
    """hidden_size of a model's (or a model config's) language model."""
    return int(text_config(getattr(model_or_config, "config", model_or_config)).hidden_size)


def max_context_of(model_or_config: Any) -> int | None:
    return getattr(text_config(getattr(model_or_config, "config", model_or_config)), "max_position_embeddings", None)


def resolve_layers(spec: list, num_layers: int) -> list[int]:
    """Layer indices from ints or depth fractions: a fraction f in (0, 1) is int(f * num_layers).

    Returns the sorted unique indices; an index outside [0, num_layers) is an error.
    """
    out = []
    for item in spec:
        if isinstance(item, float):
            layer = int(item * num_layers)
        else:
            layer = int(item)
            if layer < 0:
                layer += num_layers
        if not 0 <= layer < num_layers:
            raise WorkbenchError(f"collect.layers entry {item} is out of range: the model has layers 0..{num_layers - 1}")
        out.append(layer)
    return sorted(set(out))


class _StopForward(Exception):
    """Raised by the deepest hook: nothing after it is needed."""


def hidden_states(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states [B, L, D] from its forward output (a tuple in most transformers
    versions, the tensor itself in some)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_resid_post(model: nn.Module, layers: list[int]):
    """Hook the outputs of `layers`; yields a function running one forward that returns {layer: [B, L, D]}.

        with capture_resid_post(model, [7, 14]) as run:
            acts = run(input_ids=ids_BL, attention_mask=mask_BL)
    """
    stack = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = hidden_states(output)
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [stack[layer].register_forward_hook(make_hook(layer)) for layer in layers]

    @torch.no_grad()
    def run(**inputs: torch.Tensor) -> dict[int, torch.Tensor]:
        captured.clear()
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise RuntimeError(f"forward finished without reaching layers {missing}")
        return dict(captured)

    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()

