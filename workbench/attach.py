"""SAEs attached to a Hugging Face model at their layers' outputs, with the filter they were trained under.

    sae = AttachedSAE.from_folder("hf://adamkarvonen/qwen3-8b-saes/saes_Qwen_Qwen3-8B_batch_top_k/"
                                  "resid_post_layer_18/trainer_2")
    with attach(model, [sae]) as run:
        model(**tokenizer("The capital of France is", return_tensors="pt"))
    f_BLF, keep_BL = run[sae.name].latents_BLF, run[sae.name].keep_BL

The hook point is the one collection uses (`workbench.model.decoder_layers`): the output of decoder
layer L, TransformerLens' blocks.<L>.hook_resid_post. On every forward, for every SAE, the layer's output
goes through `workbench.sink` exactly as collection did: one median per forward batch over its real
tokens, sinks (norm > multiple x median) and first tokens dropped by `keep_mask`, with the multiple, median
rule and first-token removal the SAE folder records. Only kept tokens are encoded (`inference.encode_kept`,
so the latents equal `encode_filtered` on the same residuals); the others are zero and marked in the
capture (sink_BL, first_BL).

What the rest of the model sees:
    splice=False                   the clean layer output (the SAE only watches)
    splice=True                    kept tokens replaced by the reconstruction x_hat, as `workbench eval`
                                   splices; sinks, first tokens and padding pass through unchanged
    splice=True, keep_error=True   x + (x_hat - x_hat.detach()) at kept tokens: the output's value is the
                                   clean x, to the bit, so logits are unchanged, while the gradient reaches
                                   the latents through the decoder (the SAE error term x - x_hat kept as a
                                   constant, as in attribution patching; Syed et al. 2023, Marks et al. 2024)

With gradients enabled the latents are differentiable: after a backward, `latents_BLF.grad` holds
d(output)/d(latent) through the splice. `run.edit[name] = fn` replaces the latents the splice decodes by
fn(latents_BLF) (e.g. a zero-ablation) on the following forwards.

Meant for full-sequence forwards (`model(**batch)`, `use_cache=False`): during cached generation each
forward holds only the new tokens, and the median and first-token rule would see those alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import PurePath

import torch
from torch import nn

from workbench.config import CollectConfig
from workbench.errors import WorkbenchError
from workbench.inference import encode_kept
from workbench.model import d_model_of, decoder_layers, hidden_states
from workbench.provenance import recorded_filter
from workbench.sink import DEFAULT_SINK_MULTIPLE, first_token_mask, keep_mask, sink_filter


@dataclass
class AttachedSAE:
    """One SAE, the decoder layer whose output it reads, and the filter it was trained under."""

    sae: nn.Module  # anything with encode([N, D]) -> [N, F] per token and decode([N, F]) -> [N, D]
    layer: int
    sink_multiple: float | None = DEFAULT_SINK_MULTIPLE  # None: the sink filter off
    sink_median: str = "real"
    drop_first_token: bool = True
    name: str = "sae"
    d_in: int | None = None  # the activation width it reads, checked against the model's (None: not checked)

    @classmethod
    def from_folder(cls, ref: str | PurePath, layer: int | None = None, name: str | None = None) -> AttachedSAE:
        """An SAE folder of either format, or an hf:// reference (workbench.hub), with the layer and the filter
        it records (an SAE that records no filter gets collection's defaults). `layer` is needed only for an
        SAE that records none; given, it must agree."""
        from workbench.formats.convert import load_sae, read_weights
        from workbench.hub import resolve_sae_path

        folder = resolve_sae_path(ref)
        weights = read_weights(folder)
        provenance = weights.info.provenance
        recorded = weights.info.layer if weights.info.layer is not None else (provenance.layer if provenance else None)
        if recorded is not None and layer is not None and recorded != layer:
            raise WorkbenchError(f"{ref} is an SAE of layer {recorded}; layer {layer} contradicts it (leave it out)")
        if recorded is None and layer is None:
            raise WorkbenchError(f"{ref} records no layer; give the decoder layer whose output it reads (--layer)")
        settings = recorded_filter(provenance, CollectConfig())
        return cls(sae=load_sae(folder), layer=recorded if recorded is not None else layer,
                   sink_multiple=settings["sink_multiple"], sink_median=settings["sink_median"],
                   drop_first_token=settings["drop_first_token"], name=str(ref) if name is None else name,
                   d_in=weights.activation_dim)

    def without_filter(self) -> AttachedSAE:
        """The same SAE encoding every real token: no sink filter, no first-token removal (to see what the
        filter protects against)."""
        return replace(self, sink_multiple=None, drop_first_token=False)


@dataclass
class Capture:
    """What one attached SAE saw in the latest forward. [B, L] masks are boolean."""

    resid_BLD: torch.Tensor  # the layer's clean output: the SAE's input
    latents_BLF: torch.Tensor  # sae.encode of the kept tokens, zero elsewhere (in the SAE's dtype)
    keep_BL: torch.Tensor  # encoded: real, not a sink, not a first token
    sink_BL: torch.Tensor  # real tokens above sink_multiple x median
    first_BL: torch.Tensor  # dropped by first-token removal
    valid_BL: torch.Tensor  # real tokens (attention mask)
    norms_BL: torch.Tensor  # float32 norms the filter used
    median: torch.Tensor  # the batch median norm (0-d)


@dataclass
class Attachment:
    """The handle `attach` yields: captures by SAE name (`run[name]`), and optional latent edits."""

    saes: list[AttachedSAE]
    captures: dict[str, Capture] = field(default_factory=dict)
    edit: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Capture:
        if name not in self.captures:
            raise KeyError(f"no capture for {name!r} yet (attached: {[s.name for s in self.saes]}); run a forward first")
        return self.captures[name]


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextmanager
def attach(model: nn.Module, saes: AttachedSAE | Sequence[AttachedSAE], splice: bool = False, keep_error: bool = False,
           bos_token_id: int | None = None) -> Iterator[Attachment]:
    """Attach `saes` to `model` (see the module docstring) for the duration of the block.

    bos_token_id: the tokenizer's BOS id, as collection takes it (`first_token_mask`): every BOS token is a
    first token; None (Qwen, no BOS) makes the first real token of each row the first token. keep_error
    needs splice. Several SAEs may watch one layer; splicing takes one SAE a layer."""
    saes = [saes] if isinstance(saes, AttachedSAE) else list(saes)
    if keep_error and not splice:
        raise ValueError("keep_error=True keeps the error term of a splice: pass splice=True as well")
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"two attached SAEs share a name ({names}); give each its own name")
    stack = decoder_layers(model)
    by_layer: dict[int, list[AttachedSAE]] = {}
    for s in saes:
        if not 0 <= s.layer < len(stack):
            raise WorkbenchError(f"{s.name} is an SAE of layer {s.layer}, but the model has layers 0..{len(stack) - 1}; "
                                 "attach it to the model it was trained on")
        if s.d_in is not None and s.d_in != d_model_of(model):
            raise WorkbenchError(f"{s.name} reads {s.d_in}-wide activations, but the model's d_model is "
                                 f"{d_model_of(model)}; attach it to the model it was trained on")
        by_layer.setdefault(s.layer, []).append(s)
    if splice and any(len(group) > 1 for group in by_layer.values()):
        raise WorkbenchError("splicing takes one SAE a layer; attach the others with splice=False, in another block")
    device = next(model.parameters()).device
    for s in saes:
        s.sae.to(device)
    run = Attachment(saes)
    inputs: dict[str, torch.Tensor | None] = {}

    def record_inputs(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = kwargs.get("attention_mask")

    def make_hook(group: list[AttachedSAE]):
        def hook(_module, _inputs, output):
            h_BLD = hidden_states(output)
            mask_BL = inputs.get("attention_mask")
            valid_BL = torch.ones(h_BLD.shape[:2], dtype=torch.bool, device=h_BLD.device) if mask_BL is None \
                else mask_BL.bool()
            out_BLD = h_BLD
            for s in group:
                capture = _encode(s, h_BLD, valid_BL, inputs.get("input_ids"), bos_token_id)
                run.captures[s.name] = capture
                if splice:
                    out_BLD = _splice(s, capture, run.edit.get(s.name), keep_error)
            if out_BLD is h_BLD:
                return None
            return (out_BLD, *output[1:]) if isinstance(output, tuple) else out_BLD

        return hook

    handles = [model.register_forward_pre_hook(record_inputs, with_kwargs=True)]
    handles += [stack[layer].register_forward_hook(make_hook(group)) for layer, group in by_layer.items()]
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()


def _encode(s: AttachedSAE, h_BLD: torch.Tensor, valid_BL: torch.Tensor, ids_BL: torch.Tensor | None,
            bos_token_id: int | None) -> Capture:
    """The filter of one forward batch (collection's functions, one median) and the kept tokens' latents."""
    flt = sink_filter(h_BLD.detach(), multiple=s.sink_multiple, valid_BL=valid_BL, median_over=s.sink_median)
    if not s.drop_first_token:
        first_BL = torch.zeros_like(valid_BL)
    elif ids_BL is None:  # inputs_embeds: no ids to find BOS by, so the first real token of each row
        first_BL = first_token_mask(valid_BL.long(), valid_BL.long(), None)
    else:
        first_BL = first_token_mask(ids_BL, valid_BL.long(), bos_token_id)
    keep_BL = keep_mask(valid_BL, flt.sink_BL, first_BL)
    f_BLF = encode_kept(s.sae, h_BLD.to(_dtype_of(s.sae)), keep_BL)
    if torch.is_grad_enabled():
        if f_BLF.requires_grad:
            f_BLF.retain_grad()
        else:  # nothing upstream needs a gradient: the latents become the leaf
            f_BLF.requires_grad_(True)
    return Capture(resid_BLD=h_BLD, latents_BLF=f_BLF, keep_BL=keep_BL, sink_BL=flt.sink_BL, first_BL=first_BL,
                   valid_BL=valid_BL, norms_BL=flt.norms_BL, median=flt.median)


def _splice(s: AttachedSAE, c: Capture, edit: Callable[[torch.Tensor], torch.Tensor] | None,
            keep_error: bool) -> torch.Tensor:
    """The layer output the rest of the model sees: reconstruction (plus the error term) at kept tokens."""
    keep_BL, h_BLD = c.keep_BL, c.resid_BLD
    x_hat_ND = s.sae.decode(c.latents_BLF[keep_BL])
    edited_ND = x_hat_ND if edit is None else s.sae.decode(edit(c.latents_BLF)[keep_BL])
    if keep_error:  # x + (x_hat' - x_hat): exactly x when nothing is edited, since a - a is 0
        delta_BLD = h_BLD.new_zeros(h_BLD.shape)
        delta_BLD[keep_BL] = (edited_ND - x_hat_ND.detach()).to(h_BLD.dtype)
        return h_BLD + delta_BLD
    out_BLD = h_BLD.clone()
    out_BLD[keep_BL] = edited_ND.to(h_BLD.dtype)
    return out_BLD
