"""Evaluation with the model: the LM's loss with an SAE spliced into the residual stream.

For held-out text, per forward batch:
    loss_original       cross-entropy of the clean model
    loss_reconstructed  with the output of decoder layer L (resid_post) replaced by the SAE's x_hat
    loss_zero           with the same tokens' resid_post replaced by zeros
    frac_recovered      (loss_zero - loss_reconstructed) / (loss_zero - loss_original)   (dictionary_learning)
    kl_div              KL(clean || spliced) of the next-token distributions
Losses and KL are means over predicted tokens (every real token that has a real next token), weighted by
token across batches.

Which tokens are spliced. The SAE never saw sink tokens or first tokens (collection dropped them), so by
default they pass through unreconstructed: only tokens the filter keeps are replaced, and the zero
ablation zeroes the same tokens so that frac_recovered compares like with like. The filter is
`workbench.sink.sink_filter`, `first_token_mask` and `keep_mask`, the functions collection uses, on the
clean layer output of the same batch, so a token is spliced exactly when collection would have kept it. The
splice-all variant replaces (and zeroes) every real token: dictionary_learning's definition. Both are
computed in the same pass and reported; `splice_all` picks which one fills the reference keys.

Held-out text: the rows of the recipe's data stream after the ones collection read (rows num_rows(data)
onwards), or, with eval.split, another split of a hub dataset read from its start.

Cost: five forwards of the whole model per batch (clean, then spliced and zeroed for each variant).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import Recipe, load_recipe
from workbench.data import LOCAL_SUFFIXES, Batch, iter_batches, iter_rows, num_rows
from workbench.dist import process_state, resolve_device
from workbench.embedded import PREFIX
from workbench.errors import WorkbenchError
from workbench.files import read_json_object, write_json
from workbench.formats.convert import find_sae_folders
from workbench.formats.dictionary_learning import CONFIG_FILE, EVAL_FILE, EXTRA_SECTION, load_folder
from workbench.hub import is_hub_ref, resolve_sae_path
from workbench.model import (
    d_model_of,
    decoder_layers,
    hidden_states,
    load_config,
    load_model,
    load_tokenizer,
    num_layers_of,
)
from workbench.provenance import Provenance, recorded_filter
from workbench.sae import SAE
from workbench.sink import DEFAULT_SINK_MULTIPLE, first_token_mask, keep_mask, sink_filter

VARIANTS = ("passthrough", "splice_all")


def heldout_rows(recipe: Recipe, tokenizer) -> Iterator[list[int]]:
    """Token rows of held-out text, ceil(eval.num_tokens / context_length) of them (fewer if the text ends).

    Without eval.split: the data stream continued past the num_rows(recipe.data) rows collection read
    (those rows are re-tokenised to find where the held-out text starts). With eval.split: that split of
    data.path (a hub dataset) from its start.
    """
    d, ev = recipe.data, recipe.eval
    want = math.ceil(ev.num_tokens / d.context_length)
    if ev.split is not None:
        if d.path.startswith(PREFIX) or Path(d.path).exists() or Path(d.path).suffix in LOCAL_SUFFIXES:
            raise WorkbenchError(f"eval.split applies to hub datasets only, and data.path {d.path} is local; "
                                 "remove eval.split to evaluate on the text after the collected rows")
        yield from iter_rows(replace(d, split=ev.split, num_tokens=want * d.context_length), tokenizer)
        return
    skip = num_rows(d)
    produced = 0
    for index, row in enumerate(iter_rows(replace(d, num_tokens=(skip + want) * d.context_length), tokenizer)):
        if index >= skip:
            produced += 1
            yield row
    if produced == 0:
        raise WorkbenchError(f"data.path {d.path} has no text left after the {skip:,} rows collection read; "
                             "lower data.num_tokens for evaluation, or set eval.split to a held-out split")


@contextmanager
def splice_at(model: nn.Module, layer: int):
    """Hook the output of decoder layer `layer`; yields run(ids_BL, mask_BL, replace_BLD=None) -> (logits_BLV,
    resid_BLD): resid_BLD is the layer's clean output, and replace_BLD (when given) is what the rest of the
    model sees instead."""
    state: dict = {}

    def hook(_module, _inputs, output):
        state["resid"] = hidden_states(output)
        new = state.get("replace")
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook)

    def run(ids_BL: torch.Tensor, mask_BL: torch.Tensor, replace_BLD: torch.Tensor | None = None):
        state["replace"] = replace_BLD
        logits_BLV = model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False).logits
        return logits_BLV, state["resid"]

    try:
        yield run
    finally:
        handle.remove()


def _splice(resid_BLD: torch.Tensor, where_BL: torch.Tensor, sae: SAE, use_threshold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(resid with x_hat at where_BL, resid with zeros at where_BL); the SAE runs in float32."""
    x_ND = resid_BLD[where_BL].float()
    x_hat_ND = sae.decode(sae.encode(x_ND, use_threshold=use_threshold)) if len(x_ND) else x_ND
    spliced_BLD, zeroed_BLD = resid_BLD.clone(), resid_BLD.clone()
    spliced_BLD[where_BL] = x_hat_ND.to(resid_BLD.dtype)
    zeroed_BLD[where_BL] = 0
    return spliced_BLD, zeroed_BLD


def _loss_and_kl(clean_BLV: torch.Tensor, logits_BLV: torch.Tensor | None, ids_BL: torch.Tensor,
                 pred_BL: torch.Tensor) -> tuple[float, float]:
    """Summed cross-entropy of logits_BLV (clean when None) and summed KL(clean || logits) over predicted
    positions; row by row in float32 so a batch never holds [B, L, V] float32 twice."""
    loss_sum, kl_sum = 0.0, 0.0
    for b in range(ids_BL.shape[0]):
        pred_L = pred_BL[b]
        clean_LV = F.log_softmax(clean_BLV[b, :-1][pred_L].float(), dim=-1)
        other_LV = clean_LV if logits_BLV is None else F.log_softmax(logits_BLV[b, :-1][pred_L].float(), dim=-1)
        targets_L = ids_BL[b, 1:][pred_L]
        loss_sum += float(-other_LV.gather(1, targets_L[:, None]).sum())
        kl_sum += float((clean_LV.exp() * (clean_LV - other_LV)).sum())
    return loss_sum, kl_sum


def _frac_recovered(loss_original: float, loss_reconstructed: float, loss_zero: float) -> float | None:
    if loss_zero == loss_original:
        return None  # ablating changes nothing: the fraction is undefined
    return (loss_zero - loss_reconstructed) / (loss_zero - loss_original)


@torch.no_grad()
def evaluate_with_model(
    model: nn.Module,
    tokenizer,
    sae: SAE,
    layer: int,
    batches: Iterable[Batch],
    sink_multiple: float | None = DEFAULT_SINK_MULTIPLE,
    drop_first_token: bool = True,
    splice_all: bool = False,
    sink_median: str = "real",
    use_threshold: bool = True,
) -> dict:
    """Loss of `model` on `batches` clean, with `sae` spliced in at the output of decoder layer `layer`, and
    with it zero-ablated; both the passthrough and the splice-all variant (see the module docstring).

    sink_multiple, drop_first_token and sink_median must be what collection used for the SAE's cache.
    use_threshold=True encodes with the JumpReLU threshold (per token); False with batch top-k over the
    spliced tokens of each batch. Returns dictionary_learning's keys loss_original, loss_reconstructed,
    loss_zero, frac_recovered (the variant `splice_all` selects), kl_div (nats per predicted token), the
    same with suffixes _passthrough and _splice_all, and token counts.
    """
    device = next(model.parameters()).device
    sae = sae.to(device)
    sums = {"original": 0.0, **{f"{kind}_{v}": 0.0 for kind in ("reconstructed", "zero", "kl") for v in VARIANTS}}
    counts = {"predicted_tokens": 0, "tokens": 0, "spliced_tokens": 0, "sink_tokens": 0, "first_tokens": 0}
    with splice_at(model, layer) as run:
        for batch in batches:
            ids_BL = batch.input_ids_BL.to(device)
            mask_BL = batch.attention_mask_BL.to(device)
            valid_BL = mask_BL.bool()
            pred_BL = valid_BL[:, 1:] & valid_BL[:, :-1]
            clean_BLV, resid_BLD = run(ids_BL, mask_BL)
            flt = sink_filter(resid_BLD, sink_multiple, valid_BL, sink_median)
            first_BL = first_token_mask(ids_BL, mask_BL, tokenizer.bos_token_id) if drop_first_token else torch.zeros_like(valid_BL)
            where = {"passthrough": keep_mask(valid_BL, flt.sink_BL, first_BL), "splice_all": valid_BL}
            sums["original"] += _loss_and_kl(clean_BLV, None, ids_BL, pred_BL)[0]
            for variant in VARIANTS:
                spliced_BLD, zeroed_BLD = _splice(resid_BLD, where[variant], sae, use_threshold)
                loss, kl = _loss_and_kl(clean_BLV, run(ids_BL, mask_BL, spliced_BLD)[0], ids_BL, pred_BL)
                sums[f"reconstructed_{variant}"] += loss
                sums[f"kl_{variant}"] += kl
                sums[f"zero_{variant}"] += _loss_and_kl(clean_BLV, run(ids_BL, mask_BL, zeroed_BLD)[0], ids_BL, pred_BL)[0]
            counts["predicted_tokens"] += int(pred_BL.sum())
            counts["tokens"] += int(valid_BL.sum())
            counts["spliced_tokens"] += int(where["passthrough"].sum())
            counts["sink_tokens"] += int(flt.sink_BL.sum())
            counts["first_tokens"] += int(first_BL.sum())
    n = counts["predicted_tokens"]
    if n == 0:
        raise WorkbenchError("evaluation got no predicted tokens (every row is shorter than 2 tokens); give more text")
    out: dict = {"loss_original": sums["original"] / n}
    for variant in VARIANTS:
        recon, zero = sums[f"reconstructed_{variant}"] / n, sums[f"zero_{variant}"] / n
        out[f"loss_reconstructed_{variant}"] = recon
        out[f"loss_zero_{variant}"] = zero
        out[f"frac_recovered_{variant}"] = _frac_recovered(out["loss_original"], recon, zero)
        out[f"kl_div_{variant}"] = sums[f"kl_{variant}"] / n
    chosen = "splice_all" if splice_all else "passthrough"
    for key in ("loss_reconstructed", "loss_zero", "frac_recovered", "kl_div"):
        out[key] = out[f"{key}_{chosen}"]
    out.update(splice_mode=chosen, layer=layer, sink_multiple=sink_multiple, drop_first_token=drop_first_token,
               **counts)
    return out


def evaluate_folders(path: str | Path, recipe_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                     write: bool = True) -> dict[str, dict]:
    """`workbench eval`: evaluate one dictionary_learning SAE folder, or every one under a run directory,
    with its model on held-out text. Returns {folder: results}.

    The model and layer come from each config.json (trainer.lm_name, trainer.layer); the recipe supplies the
    text, the model's dtype and the eval section (without a recipe: the defaults, with model.name the SAEs'
    lm_name). The model is loaded and the held-out text tokenised once for all the SAEs. With write, each
    SAE's results are merged into its eval_results.json (the trainer's keys kept). `path` may be an hf://
    reference (workbench.hub); its folders are the hub cache's copy, so nothing is written into them.
    """
    from workbench.threshold import finish_interrupted_write

    if is_hub_ref(path):
        path, write = resolve_sae_path(path), False
    folders = find_sae_folders(path, formats=("dictionary_learning",))
    for folder in folders:  # an interrupted threshold write would otherwise be completed over the merged results
        finish_interrupted_write(folder)
    loaded = [(folder, *load_folder(folder)) for folder in folders]
    for folder, _, config in loaded:
        if config["trainer"].get("layer") is None:
            raise WorkbenchError(f"{folder}/config.json has no trainer.layer; cannot tell where to splice the SAE")
    lm_names = {config["trainer"].get("lm_name") for _, _, config in loaded} - {None}
    overrides = list(overrides)
    if recipe_path is None and len(lm_names) == 1 and not any(o.startswith("model.name=") for o in overrides):
        overrides.append(f"model.name={next(iter(lm_names))}")
    recipe = load_recipe(recipe_path, overrides)
    wrong = sorted(name for name in lm_names if name != recipe.model.name)
    if wrong:
        raise WorkbenchError(f"{path} holds SAEs trained on {', '.join(wrong)} but the recipe's model.name is "
                             f"{recipe.model.name}; evaluate them with the recipe they were trained with")
    model_config = load_config(recipe.model)  # the SAEs must fit the model before its weights load
    num_layers, d_model = num_layers_of(model_config), d_model_of(model_config)
    for folder, sae, config in loaded:
        layer = config["trainer"]["layer"]
        if not 0 <= layer < num_layers:
            raise WorkbenchError(f"{folder} is an SAE of layer {layer}, but {recipe.model.name} has layers 0..{num_layers - 1}; "
                                 "evaluate it with the model it was trained on")
        if sae.activation_dim != d_model:
            raise WorkbenchError(f"{folder} is an SAE of width {sae.activation_dim} activations, but {recipe.model.name} "
                                 f"has d_model {d_model}; evaluate it with the model it was trained on")
    device = resolve_device(recipe.collect.device, process_state(cpu=recipe.collect.device == "cpu"), "collect.device")
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, device)
    batches = list(iter_batches(heldout_rows(recipe, tokenizer), recipe.eval.batch_size, tokenizer.pad_token_id))
    out = {}
    for folder, sae, config in loaded:
        settings = recorded_filter(Provenance.from_dict(config.get(EXTRA_SECTION), str(folder / CONFIG_FILE)), recipe.collect)
        results = evaluate_with_model(model, tokenizer, sae, int(config["trainer"]["layer"]), batches,
                                      sink_multiple=settings["sink_multiple"], drop_first_token=settings["drop_first_token"],
                                      splice_all=recipe.eval.splice_all, sink_median=settings["sink_median"])
        results["filter_source"] = settings["filter_source"]
        if write:
            _merge_json(folder / EVAL_FILE, results)
        out[str(folder)] = results
    return out


def _merge_json(path: Path, results: dict) -> None:
    """eval_results.json with these keys added or replaced (the trainer's and threshold's kept)."""
    merged = read_json_object(path, fix="fix or delete it (training wrote it)") or {}
    write_json(path, merged | results, indent=4, resume="re-run `workbench eval`")


def render(results: dict) -> str:
    """The two variants side by side."""
    lines = [f"layer {results['layer']}: {results['predicted_tokens']:,} predicted tokens, "
             f"{results['spliced_tokens']:,} of {results['tokens']:,} tokens spliced by default "
             f"({results['sink_tokens']:,} sinks, {results['first_tokens']:,} first tokens pass through)",
             f"loss_original {results['loss_original']:.4f}",
             f"{'variant':<12} {'loss_recon':>10} {'loss_zero':>10} {'frac_rec':>9} {'kl_div':>9}"]
    for v in VARIANTS:
        frac = results[f"frac_recovered_{v}"]
        mark = "  (reported)" if results["splice_mode"] == v else ""
        lines.append(f"{v:<12} {results[f'loss_reconstructed_{v}']:>10.4f} {results[f'loss_zero_{v}']:>10.4f} "
                     f"{'-' if frac is None else f'{frac:9.4f}':>9} {results[f'kl_div_{v}']:>9.4f}{mark}")
    return "\n".join(lines)
