"""`workbench features SAE --cache CACHE --out DIR`: features.json and a static site for every SAE under SAE.

    build_features("checkpoints/demo/saes", cache="checkpoints/demo/cache", out="checkpoints/demo/features")

SAE is one SAE folder of either format (written straight into --out) or a folder of them, a training
run or an export (each SAE into its own subfolder of --out, at its path under SAE, with an index.html at
the top linking them). Everything that can be refused (a missing SAE or cache, a cache without the
SAE's layer, another d_model, an SAE without a threshold, an --out that is a file or holds something
else) is refused before anything is written. --out follows the rule of `workbench convert`
(`workbench.formats.output`): new, empty, or the earlier output of the same command from the same SAE
folder, rewritten with stale pages removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.cache import ActivationCache
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.features.compute import (
    BINS_PER_OCTAVE,
    SCHEMA,
    SCHEMA_VERSION,
    TokenText,
    feature_pass,
    latent_records,
    sink_summary,
    token_rows,
)
from workbench.features.effects import UNEMBEDDING, output_effects
from workbench.features.site import sae_files, write_root_index, write_sae_site
from workbench.files import write_json
from workbench.formats.convert import detect_format, find_sae_folders, load_sae, read_weights
from workbench.formats.output import write_output
from workbench.formats.weights import InferenceSAE
from workbench.hub import resolve_sae_path

FEATURES_FILE = "features.json"
EFFECTS_TOP = 10  # output tokens listed each way per latent


@dataclass
class SAEPlan:
    """One SAE to describe, checked against its cache: where it is, what it runs, where it goes."""

    folder: Path
    fmt: str
    kind: str
    encode: str
    module: torch.nn.Module
    width: int
    layer: int
    cache: ActivationCache
    refilter: float | None  # the SAE's own sink multiple when it differs from the cache's, else None
    sink_multiple: float | None
    sub: Path  # its folder under --out


@dataclass
class FeaturesResult:
    """What one SAE's pages say, for the command's summary line."""

    folder: Path
    out: Path
    width: int
    dead: int  # latents that never fire on a kept token
    flagged: int  # latents whose sink maximum exceeds their kept maximum
    kept_tokens: int
    sink_tokens: int


def build_features(sae: str | Path, out: str | Path, cache: str | Path | None = None, top: int = 20, window: int = 8,
                   model: ModelConfig | None = None, layer: int | None = None) -> list[FeaturesResult]:
    """Write features.json and the HTML pages of every SAE folder at or under `sae` into `out`.

    cache: the activation cache (default: the one each SAE records it was trained on); top: examples per
    latent; window: context tokens either side; model: a recipe's model section, to add the output-token
    effects (its name must be the cache's model); layer: the cache layer for SAEs that record none."""
    for name, value, least in (("--top", top, 1), ("--window", window, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise WorkbenchError(f"{name} must be an integer >= {least} (got {value!r})")
    root, out = resolve_sae_path(sae), Path(out)  # a local folder or an hf:// reference
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file; pass a new --out (a directory)")
    folders = find_sae_folders(root)
    caches: dict[Path, ActivationCache] = {}
    try:
        plans = [_plan(folder, root, cache, layer, caches) for folder in folders]
        names = {_model_name(p.cache) for p in plans}
        if model is not None and names != {model.name}:
            raise WorkbenchError(f"the recipe's model.name is {model.name}, but the SAEs' cache was collected from "
                                 f"{', '.join(sorted(names))}; give the recipe of that model")
        texts: dict[str, TokenText] = {}
        for p in plans:
            if _model_name(p.cache) not in texts:
                texts[_model_name(p.cache)] = TokenText(_tokenizer(p.cache))
        lm = _load_model(model, plans) if model is not None else None
        files = [str(p.sub / f) for p in plans for f in sae_files(p.width)]
        many = folders != [root]
        if many:
            files.append("index.html")

        def write_all() -> list[FeaturesResult]:
            results = [_describe(p, out, top, window, texts[_model_name(p.cache)], lm, model)
                       for p in plans]
            if many:
                write_root_index(out, root, results)
            return results

        return write_output(out, root, "features", "html", files, write_all)
    finally:
        for c in caches.values():
            c.close()


def _plan(folder: Path, root: Path, cache: str | Path | None, layer: int | None,
          caches: dict[Path, ActivationCache]) -> SAEPlan:
    weights = read_weights(folder)
    provenance = weights.info.provenance
    module = load_sae(folder)
    fmt = detect_format(folder)
    threshold = getattr(module, "threshold", None)
    activation = getattr(module, "activation", "jumprelu")
    if activation == "jumprelu" and threshold is not None and bool((threshold < 0).any()):
        raise WorkbenchError(f"{folder} has no JumpReLU threshold yet (it is {float(threshold.min()):g}); run "
                             f"`workbench threshold {folder}` first, so that the latents are the ones inference computes")
    cache_path = cache if cache is not None else (provenance.cache if provenance is not None else None)
    if cache_path is None:
        raise WorkbenchError(f"{folder} records no cache; pass --cache with activations of the SAE's layer")
    cache_path = Path(cache_path)
    if cache_path.resolve() not in caches:
        caches[cache_path.resolve()] = ActivationCache(cache_path)
    c = caches[cache_path.resolve()]
    recorded = weights.info.layer if weights.info.layer is not None else (provenance.layer if provenance else None)
    if recorded is not None and layer is not None and recorded != layer:
        raise WorkbenchError(f"{folder} is an SAE of layer {recorded}; --layer {layer} contradicts it (leave it out)")
    chosen = recorded if recorded is not None else layer
    if chosen is None:
        if len(c.layers) != 1:
            raise WorkbenchError(f"{folder} records no layer and the cache {cache_path} has layers {c.layers}; "
                                 "pass --layer")
        chosen = c.layers[0]
    if chosen not in c.layers:
        raise WorkbenchError(f"the cache {cache_path} has no layer {chosen} (it has {c.layers}), the layer of {folder}; "
                             "pass --cache with that layer")
    if c.d_model != weights.activation_dim:
        raise WorkbenchError(f"the cache {cache_path} has d_model {c.d_model}, but {folder} is an SAE of "
                             f"{weights.activation_dim}-wide activations; pass the cache of its model")
    # The SAE's training tokens: as collected, unless it records another multiple (threshold's rule).
    sink = provenance.sink_multiple if provenance is not None else None
    refilter = sink if sink is not None and sink != c.sink_multiple else None
    return SAEPlan(folder=folder, fmt=fmt, kind=_kind(module, weights.activation), encode=_encode_rule(module),
                   module=module, width=weights.dict_size, layer=chosen, cache=c, refilter=refilter,
                   sink_multiple=c.sink_multiple if refilter is None else refilter, sub=folder.relative_to(root))


def _kind(module: torch.nn.Module, activation: str) -> str:
    return f"{activation} (InferenceSAE)" if isinstance(module, InferenceSAE) else type(module).__name__


def _encode_rule(module: torch.nn.Module) -> str:
    """How the pass computes latents, in words (features.json sae.encode)."""
    activation = getattr(module, "activation", "jumprelu")
    if activation == "topk":
        return f"top-{module.k} per token (SAELens topk)"
    if activation == "relu":
        return "ReLU per token"
    threshold = module.threshold
    if threshold.numel() == 1 or bool((threshold == threshold.flatten()[0]).all()):
        return (f"JumpReLU per token, f = pre * (pre > {float(threshold.flatten()[0]):.6g}): the inference encode "
                "(batch top-k is not used)")
    return "JumpReLU per token with per-latent thresholds"


def _model_name(cache: ActivationCache) -> str:
    return cache.manifest["recipe"]["model"]["name"]


def _tokenizer(cache: ActivationCache):
    """The tokenizer of the model the cache records (embedded models are built locally, offline)."""
    from workbench.model import load_tokenizer

    recorded = cache.manifest["recipe"]["model"]
    return load_tokenizer(ModelConfig(name=recorded["name"], trust_remote_code=bool(recorded.get("trust_remote_code")),
                                      revision=recorded.get("revision")))


def _load_model(model: ModelConfig, plans: list[SAEPlan]) -> torch.nn.Module:
    from workbench.model import d_model_of, load_model

    lm = load_model(model, "cpu")
    for p in plans:
        if d_model_of(lm) != p.cache.d_model:
            raise WorkbenchError(f"{model.name} has d_model {d_model_of(lm)}, the cache {p.cache.root} {p.cache.d_model}; "
                                 "give the recipe of the cache's model")
    return lm


def _describe(p: SAEPlan, out: Path, top: int, window: int, text: TokenText, lm: torch.nn.Module | None,
              model: ModelConfig | None) -> FeaturesResult:
    """The pass, the contexts, the effects, features.json and the pages of one SAE."""
    stats = feature_pass(p.module, p.cache, p.layer, p.refilter, top, p.width)
    rows = torch.cat([stats.top_row_NF.flatten(), stats.sink_row_F]).numpy()
    latents = latent_records(stats, token_rows(p.cache, rows, window), text)
    if lm is not None:
        for record, effects in zip(latents, output_effects(p.module, lm, text, EFFECTS_TOP), strict=True):
            record["effects"] = effects
    doc = {
        "schema": SCHEMA, "version": SCHEMA_VERSION,
        "sae": {"folder": str(p.folder), "format": p.fmt, "kind": p.kind, "layer": p.layer, "d_model": p.cache.d_model,
                "width": p.width, "encode": p.encode},
        "cache": {"path": str(p.cache.root), "model": _model_name(p.cache), "layer": p.layer,
                  "tokens": stats.kept_tokens + stats.sink_tokens, "kept_tokens": stats.kept_tokens,
                  "sink_tokens": stats.sink_tokens, "first_tokens_skipped": stats.first_tokens_skipped,
                  "sink_multiple": p.sink_multiple, "filter_source": "cache" if p.refilter is None else "sae config"},
        "settings": {"top": top, "window": window, "histogram_bins_per_octave": BINS_PER_OCTAVE},
        "sinks": sink_summary(stats, text),
        "effects": None if model is None else {"model": model.name, "unembedding": UNEMBEDDING, "top": EFFECTS_TOP},
        "latents": latents,
    }
    folder = out / p.sub
    resume = "re-run the same command"
    write_json(folder / FEATURES_FILE, doc, indent=None, resume=resume)
    write_sae_site(folder, doc, resume)
    return FeaturesResult(folder=p.folder, out=folder, width=p.width,
                          dead=sum(lat["fires"] == 0 for lat in latents),
                          flagged=sum(lat["sink"]["dominates"] for lat in latents),
                          kept_tokens=stats.kept_tokens, sink_tokens=stats.sink_tokens)
