"""The README.md of an export folder, in the manner of the published SAE model cards: the series, the
trainer mapping, a `layer | SAE ID | width | l0 | explained variance` table from eval_results.json, how
to load the SAEs with both libraries, and the attention-sink filter they must be used with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.provenance import Provenance
from workbench.sae.registry import BY_DICT_CLASS
from workbench.sink import DEFAULT_SINK_MULTIPLE


@dataclass
class ExportedSAE:
    """One SAE of an export folder: what the model card shows about it."""

    source: Path
    folder: Path  # where it was written
    sae_id: str  # its path inside the export folder
    name: str
    layer: int | None
    dict_class: str
    width: int
    k: int | None
    group_sizes: list[int] | None
    threshold: float | None
    threshold_method: str | None
    l0: float | None
    fve: float | None
    frac_recovered: float | None = None  # from `workbench eval` (the model's loss with the SAE spliced in)
    kl_div: float | None = None


def render_model_card(saes: list[ExportedSAE], fmt: str, series: str, model_name: str | None,
                      provenance: Provenance | None) -> str:
    """Markdown for the export folder holding `saes` (format `fmt`); `model_name` and `provenance` are one
    SAE's, for what the whole run shares (model, data, sink filter)."""
    p = provenance or Provenance(recorded=frozenset())
    model = model_name or "the model"
    archs = sorted({_arch_name(s.dict_class) for s in saes})
    layers = sorted({s.layer for s in saes if s.layer is not None})
    out = [f"# {series}", "",
           f"{len(saes)} {' / '.join(archs)} sparse autoencoders on the residual stream of `{model}` "
           f"(the output of decoder layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}; "
           "TransformerLens `blocks.<L>.hook_resid_post`), trained with the SAE workbench"
           + (f" on `{p.dataset}`" if p.dataset else "") + ". "
           + ("Format: dictionary_learning (`ae.pt`, `config.json`, `eval_results.json`), in the published "
              "series' layout." if fmt == "dictionary_learning" else
              "Format: SAELens 6.x (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors` when "
              "firing rates were measured), architecture `jumprelu` with the scalar threshold broadcast to "
              "every latent; k and the Matryoshka widths are in `metadata.training_architecture_details`."),
           "", "## Trainers", "",
           "| trainer | architecture | width | k | Matryoshka group sizes | JumpReLU threshold |",
           "|---|---|---|---|---|---|"]
    seen = set()
    for s in saes:
        if s.name in seen:
            continue
        seen.add(s.name)
        groups = ", ".join(map(str, s.group_sizes)) if s.group_sizes else "-"
        thresh = f"{s.threshold_method}" if s.threshold is not None and s.threshold >= 0 else "not set (-1)"
        out.append(f"| {s.name} | {_arch_name(s.dict_class)} | {s.width} | {s.k} | {groups} | {thresh} |")
    out += ["", "The threshold column says how each SAE's scalar JumpReLU threshold was derived "
            "(`workbench threshold`: ema = the training estimate, batch-min = the BatchTopK paper's "
            "estimator, l0 = calibrated so the mean L0 on held-out tokens equals k); each SAE's config.json "
            "records the value, the previous one and the comparison under `workbench.threshold`.",
            "", "## SAEs", ""]
    spliced = any(s.frac_recovered is not None for s in saes)
    header = "| layer | SAE ID | width | l0 | explained variance |" + (" frac recovered | KL to clean |" if spliced else "")
    out += [header, "|---" * (header.count("|") - 1) + "|"]
    for s in saes:
        row = f"| {s.layer} | `{s.sae_id}` | {s.width} | {_num(s.l0, '.1f')} | {_num(s.fve, '.3f')} |"
        if spliced:
            row += f" {_num(s.frac_recovered, '.3f')} | {_num(s.kl_div, '.4f')} |"
        out.append(row)
    out += ["", "`l0` and `explained variance` are dictionary_learning's `l0` and `frac_variance_explained` "
            "(eval_results.json) on held-out activations, encoding with the JumpReLU threshold."
            + (" `frac recovered` is dictionary_learning's `frac_recovered` (the model's cross-entropy with the "
               "reconstruction spliced in at the layer, between zero-ablation and clean) and `KL to clean` the "
               "mean KL divergence from the clean model, both from `workbench eval` on held-out text, with sink "
               "and first tokens passed through unreconstructed; eval_results.json also holds the splice-every-"
               "token variants." if spliced else ""), ""]
    out += _loading(saes[0], fmt)
    out += _sink_note(p)
    return "\n".join(out) + "\n"


def _arch_name(dict_class: str) -> str:
    """The architecture's name on the card: the registry's display name, else the dictionary_learning class."""
    arch = BY_DICT_CLASS.get(dict_class)
    return dict_class if arch is None else arch.display_name


def _num(value: float | None, fmt: str) -> str:
    """A metric for a table cell; "-" when it was not measured (or is not a number)."""
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _loading(example: ExportedSAE, fmt: str) -> list[str]:
    path = example.sae_id
    if fmt == "dictionary_learning":
        native = ["```python", "from dictionary_learning.utils import load_dictionary", "",
                  f'ae, config = load_dictionary("{path}", device="cuda")',
                  "f = ae.encode(x)      # JumpReLU: f = pre * (pre > threshold), per token", "x_hat = ae.decode(f)", "```"]
        other = ["```bash", f"workbench convert {path} --to saelens --out saelens/{path}", "```",
                 "```python", "from sae_lens import SAE", "", f'sae = SAE.load_from_disk("saelens/{path}", device="cuda")', "```"]
        names = ("dictionary_learning", "SAELens")
    else:
        native = ["```python", "from sae_lens import SAE", "", f'sae = SAE.load_from_disk("{path}", device="cuda")',
                  "f = sae.encode(x)", "x_hat = sae.decode(f)", "```"]
        other = ["```bash", f"workbench convert {path} --to dictionary_learning --out dl/{path}", "```",
                 "```python", "from dictionary_learning.utils import load_dictionary", "",
                 f'ae, config = load_dictionary("dl/{path}", device="cuda")', "```"]
        names = ("SAELens", "dictionary_learning")
    return ["## Loading", "", f"With {names[0]}:", "", *native, "",
            f"With {names[1]} (an exact conversion; `workbench verify` checks both libraries give the same outputs):",
            "", *other, ""]


def _sink_note(p: Provenance) -> list[str]:
    multiple = p.sink_multiple
    first = p.drop_first_token if p.records("drop_first_token") else True
    if multiple is None:
        rule = "No attention-sink filter was applied in training."
    else:
        rule = (f"Training dropped attention-sink tokens: every token whose residual-stream norm exceeded "
                f"**{multiple:g} x the median token norm of its forward batch** (one median per batch and layer, "
                f"over {'real (non-padding) tokens' if (p.sink_median if p.records('sink_median') else 'real') == 'real' else 'all positions'}). "
                "Sinks are rare (~0.1% of tokens) but have norms 100-1000x the median, so an SAE never trained "
                "on them encodes them badly; apply the same filter when you use these SAEs (encoding, "
                "attribution, max-activating examples).")
    if first:
        rule += (" The first token of every sequence (the BOS token, or the first real token for tokenizers "
                 "without one) was dropped too.")
    m = DEFAULT_SINK_MULTIPLE if multiple is None else multiple
    return ["## Attention-sink filter", "", rule, "",
            "With the workbench installed (`encode_filtered` calls the same `sink_filter` collection used):", "",
            "```python", "from workbench.formats.convert import load_sae",
            "from workbench.inference import encode_filtered", "from workbench.sink import first_token_mask", "",
            "sae = load_sae(path)                      # either format",
            f"f_BLF, keep_BL = encode_filtered(sae, resid_BLD, multiple={m:g}, valid_BL=attention_mask.bool(),",
            "                                  first_token_BL=first_token_mask(input_ids, attention_mask, tokenizer.bos_token_id))",
            "```", "", "Without it (one forward batch `resid_BLD` [B, L, D] at the SAE's layer):", "",
            "```python", "valid_BL = attention_mask.bool()", "norms_BL = resid_BLD.float().norm(dim=-1)",
            f"keep_BL = valid_BL & (norms_BL <= {m:g} * norms_BL[valid_BL].median())",
            "keep_BL &= valid_BL.long().cumsum(1) != 1   # drop each row's first real token",
            "f_NF = sae.encode(resid_BLD[keep_BL])       # latents of the kept tokens only", "```", ""]
