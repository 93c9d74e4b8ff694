"""Sink-safe attribution on the trained tiny model: the attribution equals an autograd gradient times the
activation computed without workbench.attach; its top 10 latents agree in sign and rank with the effect of
zero-ablating each one, measured by re-running the model; with the filter off a planted sink dominates the
attribution, with it on nothing is credited there; `workbench attribute` writes the report (with feature-page
links) and the heatmap, and a target of several tokens is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close_to_scale
from tiny_sae import DEMO, LAYER, fit_sae, kept_activations, save_sae, tiny_lm

from workbench.attach import AttachedSAE
from workbench.attribution import HEATMAP_FILE, REPORT_FILE, attribute, report, top_entries
from workbench.cli import main
from workbench.embedded import resolve_model_path, sink_token_ids
from workbench.model import capture_resid_post, hidden_states

pytestmark = pytest.mark.usefixtures("one_thread")

# Two sentences of the corpus' grammar, then " According" (a planted sink token of tiny-qwen3, at position 24)
# and " to": the model predicts " the" over " a" by 4.05 logits.
SENTENCES = ("That evening the lighthouse keeper ignored the sound of bells for hours. The research team ignored the "
             "empty square without a word. According")
PROMPT, TARGET, BASELINE = SENTENCES + " to", " the", " a"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def sae_folder(lm, tmp_path_factory):
    recipe, model, tokenizer = lm
    return save_sae(fit_sae(kept_activations(recipe, model, tokenizer)), tmp_path_factory.mktemp("sae") / "trainer_0")


@pytest.fixture(scope="module")
def att(lm, sae_folder):
    _, model, tokenizer = lm
    return attribute(model, tokenizer, AttachedSAE.from_folder(sae_folder), PROMPT, TARGET, BASELINE)


def logit_diff(model, ids_BL, target: int, baseline: int, edit=None) -> torch.Tensor:
    """logits[-1, target] - logits[-1, baseline]; edit(h_BLD) -> h_BLD replaces layer LAYER's output (a plain
    forward hook, no workbench code)."""
    def hook(_module, _inputs, output):
        new = edit(hidden_states(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[LAYER].register_forward_hook(hook) if edit is not None else None
    try:
        logits_V = model(input_ids=ids_BL).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()
    return logits_V[target] - logits_V[baseline]


def test_the_sink_and_the_first_token_are_excluded(att, lm):
    recipe, _, _ = lm
    sink = sink_token_ids(resolve_model_path(recipe.model.name))
    position = att.token_ids.index(sink[1])
    assert att.tokens[position] == " According" and position == 24
    doc = report(att)
    assert [(t["position"], t["status"]) for t in doc["excluded"]] == [(0, "first token"), (24, "sink")]
    assert doc["excluded"][1]["norm_over_median"] > 10
    assert not bool(att.filtered.latents_LF[[0, 24]].any()) and not bool(att.filtered.attr_LF[[0, 24]].any())


def test_attribution_equals_autograd_gradient_times_activation(att, lm, sae_folder):
    """The reference: the clean layer output, the filter by hand (norm > 10 x the median, the first token), the
    kept tokens encoded as a leaf, spliced back as x_hat + (x - x_hat).detach() by a plain forward hook, and
    torch.autograd.grad of the logit difference."""
    _, model, tokenizer = lm
    sae = AttachedSAE.from_folder(sae_folder).sae
    ids_BL = torch.tensor([att.token_ids])
    with capture_resid_post(model, [LAYER]) as run:
        h_LD = run(input_ids=ids_BL)[LAYER][0]
    norms_L = h_LD.norm(dim=-1)
    keep_L = norms_L <= 10 * norms_L.median()
    keep_L[0] = False
    f_NF = sae.encode(h_LD[keep_L]).requires_grad_(True)

    def splice(h_BLD):
        x_hat_ND = sae.decode(f_NF)
        out_BLD = h_BLD.clone()
        out_BLD[0, keep_L] = x_hat_ND + (h_BLD[0, keep_L] - x_hat_ND).detach()
        return out_BLD

    target, baseline = att.target[0], att.baseline[0]
    metric = logit_diff(model, ids_BL, target, baseline, splice)
    (grad_NF,) = torch.autograd.grad(metric, f_NF)
    assert torch.equal(att.filtered.keep_L, keep_L)
    assert_close_to_scale(att.filtered.latents_LF[keep_L], f_NF.detach(), what="latents")
    assert_close_to_scale(att.filtered.grad_LF[keep_L], grad_NF, what="gradient")
    assert_close_to_scale(att.filtered.attr_LF[keep_L], (f_NF * grad_NF).detach(), what="attribution")
    with torch.no_grad():
        clean = float(logit_diff(model, ids_BL, target, baseline))
    assert att.filtered.metric == pytest.approx(clean, abs=1e-4) and clean > 1  # the error term: the clean output


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(x).argsort().argsort().float() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def test_top_latents_agree_with_zero_ablating_each(att, lm, sae_folder):
    """Each of the top 10 (position, latent) zero-ablated with the error term kept: the layer output at that
    position moves by -f * (its decoder row); the metric's true change against the attribution's estimate
    (measured: all 10 signs agree, Spearman 0.98)."""
    _, model, _ = lm
    W_dec_FD = AttachedSAE.from_folder(sae_folder).sae.W_dec_FD
    ids_BL = torch.tensor([att.token_ids])
    target, baseline = att.target[0], att.baseline[0]
    top = top_entries(att.filtered.attr_LF, 10)
    assert len(top) == 10
    with torch.no_grad():
        clean = float(logit_diff(model, ids_BL, target, baseline))
        effects = []
        for pos, latent, _ in top:
            def ablate(h_BLD, pos=pos, latent=latent):
                out_BLD = h_BLD.clone()
                out_BLD[0, pos] -= att.filtered.latents_LF[pos, latent] * W_dec_FD[latent]
                return out_BLD
            effects.append(clean - float(logit_diff(model, ids_BL, target, baseline, ablate)))
    estimates = [value for _, _, value in top]
    assert all((e > 0) == (a > 0) for e, a in zip(effects, estimates, strict=True)), list(zip(estimates, effects, strict=True))
    assert spearman(estimates, effects) >= 0.8


def test_with_the_filter_off_a_planted_sink_dominates(lm, sae_folder):
    """The prompt ends on the planted sink " According", so the logits are read at the sink's own position (the
    tiny model has learned to ignore its sinks elsewhere: mid-prompt one holds 1.3% of the attribution with the
    filter off). Off: the sink's latents (activations up to ~100x a kept token's) take the top attribution and
    more than 90% of the total (measured 98%); on: nothing is credited there."""
    _, model, tokenizer = lm
    a = attribute(model, tokenizer, AttachedSAE.from_folder(sae_folder), SENTENCES, TARGET, BASELINE)
    sink = len(a.tokens) - 1
    assert a.tokens[sink] == " According" and bool(a.filtered.sink_L[sink])
    off, on = a.unfiltered.attr_LF.abs(), a.filtered.attr_LF.abs()
    assert top_entries(a.unfiltered.attr_LF, 1)[0][0] == sink
    assert float(off[sink].sum()) > 0.9 * float(off.sum())
    assert float(on[sink].sum()) == 0 and top_entries(a.filtered.attr_LF, 1)[0][0] != sink
    doc = report(a, top=5)
    assert all(e["position"] == sink and e["token_status"] == "sink" for e in doc["top_filter_off"])
    assert all(e["token_status"] == "kept" for e in doc["top"])
    assert doc["totals"]["abs_attribution_filter_off_at_excluded"] > 0.9 * doc["totals"]["abs_attribution_filter_off"]


def test_the_command_writes_the_report_and_the_heatmap(lm, sae_folder, tmp_path, capsys):
    from workbench.collect import collect
    from workbench.config import load_recipe

    cache = tmp_path / "cache"
    collect(load_recipe(DEMO, [f"collect.out={cache}", "data.num_tokens=2048", f"collect.layers=[{LAYER}]"]))
    pages = tmp_path / "pages"
    assert main(["features", str(sae_folder), "--cache", str(cache), "--out", str(pages), "--top", "3"]) == 0
    out = tmp_path / "attribution"
    assert main(["attribute", str(DEMO), str(sae_folder), "--prompt", PROMPT, "--target", TARGET, "--baseline", BASELINE,
                 "--out", str(out), "--features", str(pages), "--top", "12"]) == 0
    assert "attribution.json" in capsys.readouterr().out
    doc = json.loads((out / REPORT_FILE).read_text())
    tokenizer = lm[2]
    assert doc["metric"]["target"] == {"token": TARGET, "token_id": tokenizer.encode(TARGET)[0]}
    assert doc["metric"]["baseline"] == {"token": BASELINE, "token_id": tokenizer.encode(BASELINE)[0]}
    assert doc["metric"]["value"] > 1 and len(doc["top"]) == 12 and len(doc["top_filter_off"]) == 12
    assert doc["sae"]["filter"] == {"sink_multiple": 10.0, "sink_median": "real", "drop_first_token": True}
    assert [t["status"] for t in doc["excluded"]] == ["first token", "sink"]
    for e in doc["top"]:
        page = out / e["page"]
        assert page.is_file() and page.name == f"{e['latent']}.html" and e["token"] == doc["tokens"][e["position"]]["token"]
    png = (out / HEATMAP_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(out / HEATMAP_FILE).shape[:2]
    assert width > height > 200  # two panels side by side, a row per token


def test_a_target_of_several_tokens_is_one_line(sae_folder, tmp_path, capsys):
    code = main(["attribute", str(DEMO), str(sae_folder), "--prompt", PROMPT, "--target", " lighthouse keeper",
                 "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--target ' lighthouse keeper' is" in err[0] and "single token" in err[0]
    code = main(["attribute", str(DEMO), str(sae_folder), "--prompt", PROMPT, "--target", TARGET, "--out",
                 str(tmp_path / "b"), "--features", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no features.json" in err[0]
    assert not (tmp_path / "b").exists()
