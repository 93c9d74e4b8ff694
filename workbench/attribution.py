"""Sink-safe attribution patching: which SAE latents at which positions move a metric of the output.

For a prompt and an SAE attached at its layer with the error term kept (`workbench.attach`, splice=True,
keep_error=True: the model's output is unchanged), the attribution of latent i at position p is

    attr[p, i] = f[p, i] * d metric / d f[p, i]

the first-order estimate of what zero-ablating that latent there would change (attribution patching:
Nanda 2023; Syed et al. 2023; Marks et al. 2024, "Sparse feature circuits"). The default metric is the
logit difference logit(target) - logit(baseline) at the last position (logit(target) without a baseline).

Sink-safe: only the tokens the SAE's recorded filter keeps are encoded and spliced. Sinks and first
tokens pass through unspliced, so no latent is credited there. The Qwen3 SAEs' model card warns that
latents firing on sinks "may dominate the attribution scores"; the report shows it, with the same
attribution computed with the filter off (every real token encoded) beside the filtered one.

    from workbench.attribution import attribute, report
    att = attribute(model, tokenizer, AttachedSAE.from_folder(ref), "The capital of France is", " Paris")
    doc = report(att, top=20)

`workbench attribute RECIPE SAE --prompt TEXT --target TOKEN [--baseline TOKEN] --out DIR` writes
attribution.json (the report) and attribution.png (a token x latent heatmap, filter on and off).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workbench.attach import AttachedSAE, attach
from workbench.errors import WorkbenchError

REPORT_FILE = "attribution.json"
HEATMAP_FILE = "attribution.png"


@dataclass
class Pass:
    """One attribution pass over the prompt (row 0 of a batch of one); [L, F] tensors, float32."""

    latents_LF: torch.Tensor
    grad_LF: torch.Tensor  # d metric / d latent, through the splice
    attr_LF: torch.Tensor  # latents * grad; zero at tokens not encoded
    keep_L: torch.Tensor
    sink_L: torch.Tensor
    first_L: torch.Tensor
    norms_L: torch.Tensor
    median: float
    metric: float


@dataclass
class Attribution:
    """attribute's result: the prompt's tokens, the metric, and the pass with the SAE's filter and without."""

    sae: AttachedSAE
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    target: tuple[int, str]
    baseline: tuple[int, str] | None
    filtered: Pass
    unfiltered: Pass  # the SAE encoding every real token (AttachedSAE.without_filter)


def token_id(tokenizer, text: str, what: str) -> int:
    """The id of `text` as one token of `tokenizer` (no special tokens added); else one WorkbenchError."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise WorkbenchError(f"{what} {text!r} is {len(ids)} tokens ({pieces}) for this tokenizer, not one; give a "
                             "single token (mind the leading space: ' Paris' and 'Paris' differ)")
    return ids[0]


def logit_diff(target: int, baseline: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The default metric: logits[0, -1, target] - logits[0, -1, baseline] (baseline None: the target logit)."""
    def metric(logits_BLV: torch.Tensor) -> torch.Tensor:
        last_V = logits_BLV[0, -1].float()
        return last_V[target] - (last_V[baseline] if baseline is not None else 0.0)

    return metric


def attribution_pass(model: nn.Module, ids_BL: torch.Tensor, sae: AttachedSAE,
                     metric: Callable[[torch.Tensor], torch.Tensor], bos_token_id: int | None) -> Pass:
    """One forward with `sae` spliced in with its error term, and one backward of `metric` to its latents."""
    with torch.enable_grad(), attach(model, sae, splice=True, keep_error=True, bos_token_id=bos_token_id) as run:
        logits_BLV = model(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), use_cache=False).logits
        value = metric(logits_BLV)
        c = run[sae.name]
        (grad_BLF,) = torch.autograd.grad(value, c.latents_BLF, allow_unused=True)
    latents_LF = c.latents_BLF.detach()[0].float()
    grad_LF = torch.zeros_like(latents_LF) if grad_BLF is None else grad_BLF[0].float()
    return Pass(latents_LF=latents_LF, grad_LF=grad_LF, attr_LF=latents_LF * grad_LF, keep_L=c.keep_BL[0],
                sink_L=c.sink_BL[0], first_L=c.first_BL[0], norms_L=c.norms_BL[0].detach(), median=float(c.median),
                metric=float(value.detach()))


def attribute(model: nn.Module, tokenizer, sae: AttachedSAE, prompt: str, target: str, baseline: str | None = None,
              metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Attribution:
    """Attribution of every latent at every position of `prompt` (tokenised as the tokenizer does by
    default: Gemma's adds BOS, Qwen's nothing), with the SAE's filter and without it.

    target, baseline: single tokens (text); metric: a function of the logits [1, L, V] to a scalar, instead
    of the logit difference at the last position (target and baseline then only label the report)."""
    if not prompt:
        raise WorkbenchError("--prompt is empty; give the text to attribute")
    target_id = token_id(tokenizer, target, "--target")
    baseline_id = token_id(tokenizer, baseline, "--baseline") if baseline is not None else None
    metric = metric if metric is not None else logit_diff(target_id, baseline_id)
    device = next(model.parameters()).device
    ids_BL = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    bos = tokenizer.bos_token_id
    ids = ids_BL[0].tolist()
    return Attribution(sae=sae, prompt=prompt, token_ids=ids, tokens=[tokenizer.decode([i]) for i in ids],
                       target=(target_id, target), baseline=None if baseline is None else (baseline_id, baseline),
                       filtered=attribution_pass(model, ids_BL, sae, metric, bos),
                       unfiltered=attribution_pass(model, ids_BL, sae.without_filter(), metric, bos))


def top_entries(attr_LF: torch.Tensor, n: int) -> list[tuple[int, int, float]]:
    """The n (position, latent, attribution) with the largest |attribution|, nonzero only, largest first."""
    flat = attr_LF.flatten()
    n = min(n, int((flat != 0).sum()))
    order = flat.abs().topk(n).indices.tolist() if n else []
    F = attr_LF.shape[1]
    return [(i // F, i % F, float(flat[i])) for i in order]


def _status(p: Pass, pos: int) -> str:
    return "first token" if bool(p.first_L[pos]) else "sink" if bool(p.sink_L[pos]) else "kept"


def _pages(features: str | Path | None, width: int) -> tuple[Path | None, dict | None]:
    """The feature-page folder of the SAE (features.json + latents/<i>.html) and its features.json."""
    if features is None:
        return None, None
    from workbench.features.build import FEATURES_FILE
    from workbench.files import read_json

    folder = Path(features)
    doc = read_json(folder / FEATURES_FILE, fix="re-run `workbench features`")
    if doc is None:
        raise WorkbenchError(f"--features {folder} has no {FEATURES_FILE}; give the folder `workbench features` wrote "
                             "for this SAE (the one holding features.json and latents/)")
    if doc.get("sae", {}).get("width") != width:
        raise WorkbenchError(f"--features {folder} describes an SAE of {doc.get('sae', {}).get('width')} latents, not "
                             f"this one ({width}); give the pages of this SAE")
    return folder, doc


def report(att: Attribution, top: int = 20, features: str | Path | None = None, out: str | Path | None = None) -> dict:
    """The attribution report (attribution.json's content): the prompt's tokens and what the filter did with
    each, the metric, the `top` latents by |attribution| with the filter on, the excluded tokens, and the
    top attributions with the filter off (each marked with whether the filter excludes its token).
    features: the SAE's feature-page folder, linked per latent (relative to `out` when given)."""
    f, u = att.filtered, att.unfiltered
    width = f.latents_LF.shape[1]
    pages, doc = _pages(features, width)

    def entry(rank: int, pos: int, latent: int, value: float, p: Pass) -> dict:
        e = {"rank": rank, "position": pos, "token": att.tokens[pos], "token_id": att.token_ids[pos], "latent": latent,
             "activation": float(p.latents_LF[pos, latent]), "gradient": float(p.grad_LF[pos, latent]),
             "attribution": value, "token_status": _status(f, pos)}
        if pages is not None:
            page = pages / "latents" / f"{latent}.html"
            e["page"] = os.path.relpath(page, out) if out is not None else str(page)
            e["frequency"] = doc["latents"][latent]["frequency"]
        return e

    def total(p: Pass, where_L: torch.Tensor) -> float:
        return float(p.attr_LF[where_L].abs().sum())

    excluded_L = ~f.keep_L
    tokens = [{"position": i, "token": t, "token_id": att.token_ids[i], "norm": float(f.norms_L[i]),
               "norm_over_median": float(f.norms_L[i]) / f.median if f.median > 0 else None, "status": _status(f, i)}
              for i, t in enumerate(att.tokens)]
    s = att.sae
    return {
        "schema": "workbench-attribution", "version": 1,
        "prompt": att.prompt,
        "sae": {"name": s.name, "layer": s.layer, "width": width,
                "filter": {"sink_multiple": s.sink_multiple, "sink_median": s.sink_median,
                           "drop_first_token": s.drop_first_token}},
        "metric": {"kind": "logit_diff" if att.baseline is not None else "logit", "position": len(att.tokens) - 1,
                   "target": {"token": att.target[1], "token_id": att.target[0]},
                   "baseline": None if att.baseline is None else {"token": att.baseline[1], "token_id": att.baseline[0]},
                   "value": f.metric, "value_filter_off": u.metric,
                   "rule": "attribution = latent activation x d metric / d latent, SAE spliced with its error term "
                           "kept (the output is the clean model's)"},
        "median_norm": f.median,
        "tokens": tokens,
        "excluded": [t for t in tokens if t["status"] != "kept"],
        "top": [entry(r, pos, lat, v, f) for r, (pos, lat, v) in enumerate(top_entries(f.attr_LF, top))],
        "top_filter_off": [entry(r, pos, lat, v, u) for r, (pos, lat, v) in enumerate(top_entries(u.attr_LF, top))],
        "totals": {"abs_attribution": total(f, f.keep_L), "abs_attribution_filter_off": total(u, u.keep_L),
                   "abs_attribution_filter_off_at_excluded": total(u, excluded_L & u.keep_L)},
    }


def plot(att: Attribution, path: str | Path, top: int = 20) -> None:
    """attribution.png: the prompt's tokens (rows) x the latents of the top attributions (columns), with the
    filter on (left) and off (right); tokens the filter excludes are labelled, and hatched where they were not
    encoded. Diverging colours, 0 white, each panel on its own symmetric scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.files import write_atomic

    panels = [("filter on (as trained)", att.filtered), ("filter off (every token encoded)", att.unfiltered)]
    labels = [f"{i}: {t!r}" + ("" if _status(att.filtered, i) == "kept" else f" [{_status(att.filtered, i)}]")
              for i, t in enumerate(att.tokens)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.3 * len(labels) + 2.5), squeeze=False)
    for ax, (title, p) in zip(axes[0], panels, strict=True):
        latents = list(dict.fromkeys(lat for _, lat, _ in top_entries(p.attr_LF, top)))
        values = p.attr_LF[:, latents].numpy() if latents else torch.zeros(len(labels), 1).numpy()
        scale = float(abs(values).max()) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
        for pos in torch.nonzero(~p.keep_L).flatten().tolist():  # not encoded in this pass: hatched grey
            ax.axhspan(pos - 0.5, pos + 0.5, facecolor="0.85", hatch="//", edgecolor="0.6", linewidth=0)
        ax.set_xticks(range(len(latents)), [str(lat) for lat in latents], rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("latent")
        ax.set_title(f"{title}: metric {p.metric:.3g}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04, label="attribution")
    fig.suptitle(f"{att.sae.name} (layer {att.sae.layer})", fontsize=9)
    fig.tight_layout()
    try:
        write_atomic(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=90))
    finally:
        plt.close(fig)


def attribute_command(recipe_path: str, sae: str, prompt: str, target: str, baseline: str | None, out: str | Path,
                      features: str | Path | None = None, top: int = 20, layer: int | None = None) -> dict:
    """`workbench attribute`: the model from the recipe's model section, the SAE folder or hf:// reference,
    attribution.json and attribution.png into `out` (claimed as `formats.output.write_output` says).
    Returns the report."""
    from workbench.config import load_recipe
    from workbench.dist import process_state, resolve_device
    from workbench.files import write_json
    from workbench.formats.convert import read_weights
    from workbench.formats.output import write_output
    from workbench.hub import resolve_sae_path
    from workbench.model import load_model, load_tokenizer

    recipe = load_recipe(recipe_path)
    folder = resolve_sae_path(sae)
    attached = AttachedSAE.from_folder(folder, layer=layer, name=str(sae))
    tokenizer = load_tokenizer(recipe.model)
    token_id(tokenizer, target, "--target")  # every argument checked before the model loads
    if baseline is not None:
        token_id(tokenizer, baseline, "--baseline")
    _pages(features, read_weights(folder).dict_size)
    device = resolve_device(recipe.collect.device, process_state(cpu=recipe.collect.device == "cpu"), "collect.device")
    model = load_model(recipe.model, device)
    att = attribute(model, tokenizer, attached, prompt, target, baseline)
    out = Path(out)
    doc = report(att, top=top, features=features, out=out)

    def write_all() -> dict:
        write_json(out / REPORT_FILE, doc, resume="re-run `workbench attribute`")
        plot(att, out / HEATMAP_FILE, top=top)
        return doc

    return write_output(out, folder, "attribute", "json+png", [REPORT_FILE, HEATMAP_FILE], write_all)
