"""Evaluation with the model: frac_recovered against a hand-written reference, and sink passthrough vs
splice-all on the tiny model with planted sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workbench.cli import main
from workbench.config import load_recipe
from workbench.data import iter_batches, iter_rows
from workbench.errors import WorkbenchError
from workbench.evaluate import evaluate_with_model, heldout_rows
from workbench.formats.dictionary_learning import save_folder
from workbench.model import capture_resid_post, load_model, load_tokenizer
from workbench.sae import BatchTopKSAE
from workbench.sink import first_token_mask, sink_filter

REPO = Path(__file__).resolve().parents[1]
LAYER = 2  # resid_post of layer 2 of 4: layer 3 exists, so the reference can swap layer 3's input
FIT_ROWS = 64  # rows 0..63 stand in for the cache; evaluation reads the rows after them
EVAL = ["data.num_tokens=8192", "eval.num_tokens=3072"]  # 64 cache rows, 24 held-out rows of 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    recipe = load_recipe(REPO / "recipes/demo.yaml", EVAL)
    return recipe, load_model(recipe.model), load_tokenizer(recipe.model)


def eval_batches(recipe, tokenizer):
    return list(iter_batches(heldout_rows(recipe, tokenizer), 8, tokenizer.pad_token_id))


def resid(model, batches):
    """(kept activations, sink activations, largest batch median, every real token's activation) at LAYER,
    filtered as collection does."""
    kept, sinks, medians, every = [], [], [], []
    with capture_resid_post(model, [LAYER]) as run:
        for b in batches:
            h_BLD = run(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL)[LAYER]
            flt = sink_filter(h_BLD, 10, b.attention_mask_BL.bool())
            first_BL = first_token_mask(b.input_ids_BL, b.attention_mask_BL, None)
            kept.append(h_BLD[flt.keep_BL & ~first_BL])
            sinks.append(h_BLD[flt.sink_BL])
            medians.append(float(flt.median))
            every.append(h_BLD[b.attention_mask_BL.bool()])
    return torch.cat(kept), torch.cat(sinks), max(medians), torch.cat(every)


@pytest.fixture(scope="module")
def acts(lm):
    recipe, model, tokenizer = lm
    fit = list(iter_batches(iter_rows(recipe.data, tokenizer), 16, tokenizer.pad_token_id))
    return resid(model, fit), resid(model, eval_batches(recipe, tokenizer))


def threshold_clearance(sae: BatchTopKSAE, h_ND: torch.Tensor, threshold: float) -> float:
    """How far the pre-activations of h_ND stay from `threshold`, each relative to the magnitude of the terms
    its product sums (|h - b_dec| @ |W_enc| + |b_enc|), which is what rounding scales with."""
    with torch.no_grad():
        magnitude_NF = (h_ND - sae.b_dec).abs() @ sae.encoder.weight.T.abs() + sae.encoder.bias.abs()
        return float(((sae.pre_acts(h_ND) - threshold).abs() / magnitude_NF).min())


@pytest.fixture(scope="module")
def fitted_sae(acts):
    """A BatchTopK SAE fitted for 300 Adam steps on kept tokens only (as the trainer would: no sinks, no
    first tokens). Its threshold: the value at which the JumpReLU L0 on those tokens is k, moved up (by less
    than 2x) into the widest gap between the pre-activations of the evaluation tokens. There the density of
    pre-activations is ~1e6 a unit, so at the L0-k value some latent sits within rounding of it; the
    hand-written reference rounds differently from evaluate (another forward invocation, a matmul for
    nn.Linear), and one latent firing in only one of them moves the KL by 40x its tolerance (measured)."""
    (X_ND, _, _, _), (_, _, _, eval_ND) = acts
    torch.manual_seed(0)
    sae = BatchTopKSAE(64, 256, 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(300):
        x_BD = X_ND[torch.randint(0, len(X_ND), (512,))]
        loss = (sae.decode(sae.encode(x_BD, use_threshold=False)) - x_BD).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        theta_k = float(torch.quantile(sae.pre_acts(X_ND).flatten(), 1 - 8 / 256))
        values = sae.pre_acts(eval_ND).flatten()
        values = values[(values >= theta_k) & (values <= 2 * theta_k)].sort().values
        widest = int((values[1:] - values[:-1]).argmax())
        sae.threshold.fill_(float(values[widest] + values[widest + 1]) / 2)
    return sae.requires_grad_(False)


def ce(logits_BLV, ids_BL):
    """Summed next-token cross-entropy over every position (packed rows: all real)."""
    return F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1), ids_BL[:, 1:].flatten(), reduction="sum")


def logits_with(model, batch, h_new_BLD):
    """The logits with layer LAYER + 1's input (= layer LAYER's output) swapped by a forward pre-hook."""
    handle = model.model.layers[LAYER + 1].register_forward_pre_hook(lambda _m, args: (h_new_BLD, *args[1:]))
    try:
        return model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    finally:
        handle.remove()


def reference(model, sae, batches):
    """The three losses and the KL computed independently of workbench.evaluate: the clean resid from
    output_hidden_states, sinks and first tokens by hand, x_hat from the raw weights, and the replacement
    made by a forward *pre*-hook on layer LAYER + 1 that swaps that layer's input."""
    W_enc_DF, b_enc_F, W_dec_FD = sae.encoder.weight.T, sae.encoder.bias, sae.decoder.weight.T
    totals: dict[str, float] = {}
    n = sinks = 0

    def add(key, value):
        totals[key] = totals.get(key, 0.0) + float(value)

    with torch.no_grad():
        for b in batches:
            ids_BL, mask_BL = b.input_ids_BL, b.attention_mask_BL
            assert bool(mask_BL.all())  # packed rows: every position is real
            out = model(input_ids=ids_BL, attention_mask=mask_BL, output_hidden_states=True)
            h_BLD = out.hidden_states[LAYER + 1]  # = output of decoder layer LAYER
            norms_BL = h_BLD.norm(dim=-1)
            sink_BL = norms_BL > 10 * norms_BL.flatten().median()
            first_BL = torch.zeros_like(sink_BL)
            first_BL[:, 0] = True  # Qwen: no BOS, the first token of each row
            pre_BLF = torch.relu((h_BLD - sae.b_dec) @ W_enc_DF + b_enc_F)
            x_hat_BLD = (pre_BLF * (pre_BLF > sae.threshold)) @ W_dec_FD + sae.b_dec
            clean_logp = F.log_softmax(out.logits[:, :-1], dim=-1)
            add("original", ce(out.logits, ids_BL))
            for name, where_BL in (("passthrough", ~sink_BL & ~first_BL), ("splice_all", torch.ones_like(sink_BL))):
                recon = logits_with(model, b, torch.where(where_BL[..., None], x_hat_BLD, h_BLD))
                add(f"reconstructed_{name}", ce(recon, ids_BL))
                add(f"zero_{name}", ce(logits_with(model, b, torch.where(where_BL[..., None], 0.0, h_BLD)), ids_BL))
                add(f"kl_{name}", F.kl_div(F.log_softmax(recon[:, :-1], dim=-1), clean_logp, log_target=True, reduction="sum"))
            n += ids_BL.shape[0] * (ids_BL.shape[1] - 1)
            sinks += int(sink_BL.sum())
    ref = {"loss_original": totals["original"] / n, "sink_tokens": sinks, "predicted_tokens": n}
    for name in ("passthrough", "splice_all"):
        recon, zero = totals[f"reconstructed_{name}"] / n, totals[f"zero_{name}"] / n
        ref[f"loss_reconstructed_{name}"] = recon
        ref[f"loss_zero_{name}"] = zero
        ref[f"frac_recovered_{name}"] = (zero - recon) / (zero - ref["loss_original"])
        ref[f"kl_div_{name}"] = totals[f"kl_{name}"] / n
    return ref


def test_frac_recovered_matches_a_hand_written_reference(lm, acts, fitted_sae):
    recipe, model, tokenizer = lm
    batches = eval_batches(recipe, tokenizer)
    # Every latent fires in both computations or in neither: each pre-activation is further from the
    # threshold than 1e-5 of its products' magnitude, and two fp32 computations of these 64-term products
    # differ by <= 3.3e-7 of it (measured: nn.Linear against a matmul plus bias, 7-row batches). Then the
    # losses differ only by the rounding of their sums over 3048 tokens (~1e-7 relative): rel=1e-5 holds.
    assert threshold_clearance(fitted_sae, acts[1][3], float(fitted_sae.threshold)) > 1e-5
    got = evaluate_with_model(model, tokenizer, fitted_sae, LAYER, batches, sink_multiple=10, drop_first_token=True)
    ref = reference(model, fitted_sae, batches)
    assert got["sink_tokens"] == ref["sink_tokens"] > 0  # the planted sinks are in the held-out text
    assert got["predicted_tokens"] == ref["predicted_tokens"] == 24 * 127
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the reference keys carry the default (passthrough) variant
    for key in ("loss_reconstructed", "loss_zero", "frac_recovered", "kl_div"):
        assert got[key] == got[f"{key}_passthrough"]
    spliced_all = evaluate_with_model(model, tokenizer, fitted_sae, LAYER, batches, splice_all=True)
    assert spliced_all["frac_recovered"] == pytest.approx(ref["frac_recovered_splice_all"], rel=1e-5)


def clipping_sae(sink_dirs_RD: torch.Tensor, clip: float) -> BatchTopKSAE:
    """A hand-built SAE that is exact on ordinary tokens and wrong on sinks, like an SAE that never saw them:
    latents +e_i and -e_i reconstruct any x exactly (relu(x_i) - relu(-x_i) = x_i), and latents +-u_r fire
    only when x . (+-u_r) > clip and pull that component back to clip, shrinking a sink to ordinary norm."""
    D = sink_dirs_RD.shape[1]
    eye_DD = torch.eye(D)
    dirs_SD = torch.cat([sink_dirs_RD, -sink_dirs_RD])
    sae = BatchTopKSAE(D, 2 * D + len(dirs_SD), D)
    with torch.no_grad():
        sae.decoder.weight.copy_(torch.cat([eye_DD, -eye_DD, -dirs_SD]).T)
        sae.encoder.weight.copy_(torch.cat([eye_DD, -eye_DD, dirs_SD]))
        sae.encoder.bias.zero_()
        sae.encoder.bias[2 * D:] = -clip
        sae.b_dec.zero_()
        sae.threshold.zero_()
    return sae


def test_sinks_pass_through_exactly_while_splice_all_distorts_them(lm, acts):
    recipe, model, tokenizer = lm
    (_, fit_sinks_ND, fit_max_median, _), (_, eval_sinks_ND, eval_max_median, _) = acts
    # The planted sinks are 3 token embeddings: their activations span 3 directions.
    sink_dirs_RD = torch.linalg.svd(fit_sinks_ND, full_matrices=False).Vh[:3]
    # The sink latents pull a sink's component along its direction back to 2x the median norm. On the trained
    # model a sink is one massive channel, so a milder clip leaves its direction (all the next RMSNorm sees)
    # nearly unchanged. Kept tokens lie far below 2x the median along those directions, so the sink latents
    # never fire on them: passthrough stays exact (asserted below).
    clip = 2 * max(fit_max_median, eval_max_median)
    sae = clipping_sae(sink_dirs_RD, clip)
    x_hat_ND = sae.decode(sae.encode(eval_sinks_ND))
    assert bool((x_hat_ND.norm(dim=1) < 0.2 * eval_sinks_ND.norm(dim=1)).all())  # sinks shrink 5x and more
    r = evaluate_with_model(model, tokenizer, sae, LAYER, eval_batches(recipe, tokenizer), sink_multiple=10)
    assert r["sink_tokens"] == len(eval_sinks_ND) > 0
    # passthrough: every spliced token is reconstructed exactly, so the model is exactly the clean model.
    # Exact by construction: on those tokens the products multiply by 0 and +-1 only, which no summation order
    # rounds (x_hat == x bit for bit), and the sink latents stay off by a margin of 5x the median norm.
    assert r["kl_div_passthrough"] == 0.0
    assert r["loss_reconstructed_passthrough"] == r["loss_original"]
    assert r["frac_recovered_passthrough"] == 1.0
    # splice-all: the sinks are distorted and the model moves (measured on the trained tiny model: KL 8.2e-4,
    # loss -2.9e-3 nats; the bounds leave about a 3x margin)
    assert r["kl_div_splice_all"] > 2.5e-4
    assert abs(r["loss_reconstructed_splice_all"] - r["loss_original"]) > 1e-3
    assert r["frac_recovered_splice_all"] != 1.0


def test_fitted_sae_passthrough_is_closer_to_the_clean_model_than_splice_all(lm, fitted_sae):
    recipe, model, tokenizer = lm
    r = evaluate_with_model(model, tokenizer, fitted_sae, LAYER, eval_batches(recipe, tokenizer), sink_multiple=10)
    assert r["kl_div_passthrough"] < r["kl_div_splice_all"]
    assert r["loss_reconstructed_passthrough"] != r["loss_reconstructed_splice_all"]
    # zeroing the sinks too is a far bigger intervention: the two ablation baselines differ
    assert r["loss_zero_splice_all"] != pytest.approx(r["loss_zero_passthrough"], rel=0.05)


def test_heldout_rows_are_the_rows_after_the_collected_ones(lm):
    recipe, _, tokenizer = lm
    recipe = load_recipe(REPO / "recipes/demo.yaml", ["data.num_tokens=1280", "eval.num_tokens=300"])
    held = list(heldout_rows(recipe, tokenizer))
    longer = load_recipe(REPO / "recipes/demo.yaml", ["data.num_tokens=1664"]).data  # 13 rows
    stream = list(iter_rows(longer, tokenizer))
    assert len(held) == 3 and held == stream[10:13]  # ceil(300 / 128) = 3 rows after rows 0..9
    assert not any(row in stream[:10] for row in held)


def test_eval_split_on_local_text_is_refused(lm):
    _, _, tokenizer = lm
    recipe = load_recipe(REPO / "recipes/demo.yaml", ["eval.split=validation"])
    with pytest.raises(WorkbenchError, match="hub datasets only"):
        next(heldout_rows(recipe, tokenizer))


def _sae_folder(path: Path, sae: BatchTopKSAE, lm_name: str = "embedded:tiny-qwen3") -> Path:
    config = {"trainer": {"trainer_class": "BatchTopKTrainer", "dict_class": "BatchTopKSAE", "k": 8, "layer": LAYER,
                          "lm_name": lm_name},
              "buffer": {"d_submodule": 64, "io": "out", "ctx_len": 128},
              "workbench": {"sink_multiple": 10, "drop_first_token": True, "sink_median": "real"}}
    save_folder(sae, path, config, eval_results={"l0": 8.0, "frac_variance_explained": 0.9})
    return path


def test_cli_eval_of_a_run_merges_the_loss_keys_into_each_eval_results(lm, fitted_sae, tmp_path, capsys):
    recipe, model, tokenizer = lm
    run = tmp_path / "saes" / f"resid_post_layer_{LAYER}"
    _sae_folder(run / "trainer_0", fitted_sae)
    dense = BatchTopKSAE(64, 256, 8)
    dense.load_state_dict(fitted_sae.state_dict())
    dense.threshold.fill_(0.0)  # every positive pre-activation fires: a different SAE
    _sae_folder(run / "trainer_1", dense)
    assert main(["eval", str(tmp_path / "saes"), str(REPO / "recipes/demo.yaml"), *EVAL]) == 0
    assert capsys.readouterr().out.count("splice_all") == 2
    results = [json.loads((run / name / "eval_results.json").read_text()) for name in ("trainer_0", "trainer_1")]
    assert results[0]["l0"] == 8.0 and results[0]["frac_variance_explained"] == 0.9  # the trainer's keys are kept
    direct = evaluate_with_model(model, tokenizer, fitted_sae, LAYER, eval_batches(recipe, tokenizer))
    for key in ("loss_original", "loss_reconstructed", "loss_zero", "frac_recovered", "kl_div",
                "frac_recovered_splice_all", "kl_div_splice_all"):
        assert results[0][key] == pytest.approx(direct[key], rel=1e-6), key
    assert results[0]["filter_source"] == "sae config" and results[0]["splice_mode"] == "passthrough"
    assert results[1]["loss_original"] == results[0]["loss_original"]
    assert results[1]["kl_div"] != results[0]["kl_div"]


def test_cli_eval_refuses_an_sae_of_another_model(fitted_sae, tmp_path, capsys):
    folder = _sae_folder(tmp_path / "trainer_0", fitted_sae, lm_name="Qwen/Qwen3-8B")
    assert main(["eval", str(folder), str(REPO / "recipes/demo.yaml"), *EVAL]) == 2
    assert "trained on Qwen/Qwen3-8B" in capsys.readouterr().err
