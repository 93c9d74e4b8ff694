"""`attach`: on the trained tiny model with its planted sinks, the captured latents equal `encode_filtered` on
the same residuals (one median per forward batch, padding, first tokens with and without BOS); with the error
term kept and nothing edited the logits are bit-identical to the clean model's while the latents get a
gradient; the plain splice equals `workbench eval`'s passthrough splice; settings come from the folder."""

from __future__ import annotations

import pytest
import torch
from tiny_sae import LAYER, fit_sae, kept_activations, save_sae, tiny_lm

from workbench.attach import AttachedSAE, attach
from workbench.data import iter_batches, iter_rows
from workbench.embedded import resolve_model_path, sink_token_ids
from workbench.errors import WorkbenchError
from workbench.evaluate import _splice, splice_at
from workbench.inference import encode_filtered
from workbench.model import capture_resid_post
from workbench.sae import BatchTopKSAE
from workbench.sink import first_token_mask, sink_filter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def sae_folder(lm, tmp_path_factory):
    recipe, model, tokenizer = lm
    return save_sae(fit_sae(kept_activations(recipe, model, tokenizer)), tmp_path_factory.mktemp("sae") / "trainer_0")


@pytest.fixture(scope="module")
def batches(lm):
    """Two forward batches of 4 rows: packed text, then the same rows cut to ragged lengths and right-padded;
    a planted sink token written into two rows, so both batches hold sinks."""
    recipe, model, tokenizer = lm
    sink = sink_token_ids(resolve_model_path(recipe.model.name))[0]
    rows = [r[:48] for _, r in zip(range(8), iter_rows(recipe.data, tokenizer), strict=False)]
    rows[1][20], rows[6][9] = sink, sink
    ragged = [r[:n] for r, n in zip(rows[4:], (48, 40, 30, 21), strict=True)]
    return list(iter_batches(iter(rows[:4] + ragged), 4, tokenizer.pad_token_id))


def test_captured_latents_equal_encode_filtered_batch_by_batch(lm, sae_folder, batches):
    _, model, _ = lm
    s = AttachedSAE.from_folder(sae_folder)
    assert (s.layer, s.sink_multiple, s.sink_median, s.drop_first_token) == (LAYER, 10.0, "real", True)
    medians = []
    for b in batches:
        with torch.no_grad():
            with capture_resid_post(model, [LAYER]) as clean:
                resid_BLD = clean(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL)[LAYER]
            with attach(model, s) as run:
                model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL)
            c = run[s.name]
            assert torch.equal(c.resid_BLD, resid_BLD)
            valid_BL = b.attention_mask_BL.bool()
            first_BL = first_token_mask(b.input_ids_BL, b.attention_mask_BL, None)
            f_BLF, keep_BL = encode_filtered(s.sae, resid_BLD, 10.0, valid_BL, "real", first_BL)
            assert torch.equal(c.keep_BL, keep_BL) and torch.equal(c.latents_BLF, f_BLF)
            flt = sink_filter(resid_BLD, 10.0, valid_BL)
            assert torch.equal(c.sink_BL, flt.sink_BL) and torch.equal(c.first_BL, first_BL)
            assert float(c.median) == float(flt.median)
            assert int(c.sink_BL.sum()) >= 1 and not bool(c.keep_BL[c.sink_BL].any())  # sinks marked, not encoded
            assert not bool(c.keep_BL[~valid_BL].any()) and not bool(c.latents_BLF[~keep_BL].any())
            assert bool((c.latents_BLF[keep_BL] != 0).any())
            medians.append(float(c.median))
    assert medians[0] != medians[1]  # each forward batch its own median


def test_the_error_term_leaves_logits_bit_identical_and_latents_differentiable(lm, sae_folder, batches):
    _, model, _ = lm
    s = AttachedSAE.from_folder(sae_folder)
    b = batches[1]
    with torch.no_grad():
        clean_BLV = model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL).logits
    with attach(model, s, splice=True, keep_error=True) as run:
        logits_BLV = model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL).logits
        assert torch.equal(logits_BLV, clean_BLV)
        logits_BLV[0, -1].logsumexp(-1).backward()
        grad_BLF = run[s.name].latents_BLF.grad
    assert grad_BLF is not None and bool((grad_BLF[0][run[s.name].keep_BL[0]] != 0).any())
    assert not bool(grad_BLF[1:].any())  # other rows do not reach row 0's output


def test_the_splice_equals_eval_passthrough_and_an_edit_changes_the_output(lm, sae_folder, batches):
    _, model, _ = lm
    s = AttachedSAE.from_folder(sae_folder)
    b = batches[0]
    ids_BL, mask_BL = b.input_ids_BL, b.attention_mask_BL
    with torch.no_grad():
        with splice_at(model, LAYER) as run_eval:
            _, resid_BLD = run_eval(ids_BL, mask_BL)
            with attach(model, s) as watch:
                model(input_ids=ids_BL, attention_mask=mask_BL)
            spliced_BLD, _ = _splice(resid_BLD, watch[s.name].keep_BL, s.sae, use_threshold=True)
            expected_BLV = run_eval(ids_BL, mask_BL, spliced_BLD)[0]
        with attach(model, s, splice=True) as run:
            assert torch.equal(model(input_ids=ids_BL, attention_mask=mask_BL).logits, expected_BLV)
        clean_BLV = model(input_ids=ids_BL, attention_mask=mask_BL).logits
        with attach(model, s, splice=True, keep_error=True) as run:
            run.edit[s.name] = torch.zeros_like  # every latent ablated: x - x_hat + b_dec at kept tokens
            ablated_BLV = model(input_ids=ids_BL, attention_mask=mask_BL).logits
    assert float((ablated_BLV - clean_BLV).abs().max()) > 1e-2


def test_gemma_first_tokens_are_the_bos_tokens(tmp_path):
    """tiny-gemma3 has a BOS: with bos_token_id every BOS is a first token, as collection drops them."""
    from workbench.config import ModelConfig
    from workbench.model import load_model, load_tokenizer

    cfg = ModelConfig(name="embedded:tiny-gemma3", dtype="float32")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    enc = tokenizer(["The garden heard a song.", "A quiet village opened the old door at dawn."], return_tensors="pt",
                    padding=True)
    torch.manual_seed(0)
    sae = BatchTopKSAE(64, 128, 8)
    with torch.no_grad():
        sae.threshold.fill_(0.0)
    s = AttachedSAE(sae=sae, layer=3)
    with torch.no_grad(), attach(model, s, bos_token_id=tokenizer.bos_token_id) as run:
        model(**enc)
    first_BL = first_token_mask(enc["input_ids"], enc["attention_mask"], tokenizer.bos_token_id)
    assert torch.equal(run[s.name].first_BL, first_BL) and torch.equal(first_BL, enc["input_ids"] == tokenizer.bos_token_id)
    f_BLF, keep_BL = encode_filtered(sae, run[s.name].resid_BLD, 10.0, enc["attention_mask"].bool(), "real", first_BL)
    assert torch.equal(run[s.name].latents_BLF, f_BLF) and torch.equal(run[s.name].keep_BL, keep_BL)


def test_settings_come_from_the_folder_and_wrong_ones_are_refused(lm, sae_folder, tmp_path):
    _, model, _ = lm
    other = save_sae(BatchTopKSAE(64, 256, 8), tmp_path / "five", layer=3, sink_multiple=5.0)
    s = AttachedSAE.from_folder(other)
    assert (s.layer, s.sink_multiple) == (3, 5.0)
    assert AttachedSAE.from_folder(sae_folder).without_filter().sink_multiple is None
    with pytest.raises(WorkbenchError, match="is an SAE of layer 3; layer 2 contradicts it"):
        AttachedSAE.from_folder(other, layer=2)
    with pytest.raises(WorkbenchError, match="has layers 0..3"):
        with attach(model, AttachedSAE(sae=s.sae, layer=9)):
            pass
    with pytest.raises(WorkbenchError, match="reads 32-wide activations, but the model's d_model is 64"):
        with attach(model, AttachedSAE(sae=BatchTopKSAE(32, 64, 4), layer=1, d_in=32)):
            pass
    with pytest.raises(WorkbenchError, match="splicing takes one SAE a layer"):
        with attach(model, [s, AttachedSAE(sae=s.sae, layer=3, name="twin")], splice=True):
            pass
    with pytest.raises(ValueError, match="pass splice=True"):
        with attach(model, s, keep_error=True):
            pass


def test_inputs_embeds_drop_the_first_real_token_of_each_row(lm, sae_folder, batches):
    """Without input_ids there is no BOS to look for: the first real token of each row is the first token (what
    collection drops for Qwen); the latents still equal encode_filtered."""
    _, model, _ = lm
    s = AttachedSAE.from_folder(sae_folder)
    b = batches[1]
    with torch.no_grad(), attach(model, s) as run:
        model(inputs_embeds=model.get_input_embeddings()(b.input_ids_BL), attention_mask=b.attention_mask_BL)
    c = run[s.name]
    first_BL = first_token_mask(b.input_ids_BL, b.attention_mask_BL, None)
    assert torch.equal(c.first_BL, first_BL) and int(first_BL.sum()) == 4
    f_BLF, keep_BL = encode_filtered(s.sae, c.resid_BLD, 10.0, b.attention_mask_BL.bool(), "real", first_BL)
    assert torch.equal(c.latents_BLF, f_BLF) and torch.equal(c.keep_BL, keep_BL)
