"""`workbench features`: the top examples, frequencies, histograms and sink report of every latent equal a
brute-force recomputation with plain numpy over the cache read through h5py; a planted sink token is never
an example and is counted by the sink report; an SAE recording another sink multiple is re-filtered; both
formats give the same pages; the output-token effects equal W_U @ (g * d_i); every error a user can cause is
one line, exit 2, with earlier outputs intact."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FP32_TOL

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.embedded import resolve_model_path, sink_token_ids
from workbench.export import export_run
from workbench.formats import dictionary_learning as dl
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
LAYER, D, F, TOP = 2, 64, 128, 10


def save_sae(sae, folder: Path, layer: int, cache: Path, sink_multiple: float | None = 10.0) -> Path:
    """An SAE folder in the dictionary_learning format, written by the workbench's own format code."""
    groups = [0.25, 0.75] if isinstance(sae, MatryoshkaBatchTopKSAE) else None
    trainer = dl.trainer_section(sae, lr=1e-3, steps=10, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                 threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=layer,
                                 lm_name="embedded:tiny-qwen3", group_fractions=groups, group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(sae.activation_dim, 128, 1, 16, 512, "cpu"),
              "workbench": {"cache": str(cache), "sink_multiple": sink_multiple}}
    dl.save_folder(sae, folder, config)
    return folder


def random_sae(sae, threshold: float = 0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
        sae.b_dec.normal_(0, 0.01)
        sae.b_enc_F.normal_(0, 0.01)
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A demo cache of 16k tokens (about 90 planted sinks), a run of a BatchTopK and a Matryoshka SAE on
    layer 2, its SAELens export, and `workbench features` of the run (the CLI)."""
    root = tmp_path_factory.mktemp("features")
    cache = root / "cache"
    collect(load_recipe(DEMO, [f"collect.out={cache}", "data.num_tokens=16384"]))
    run = root / "run"
    save_sae(random_sae(BatchTopKSAE(D, F, 8)), run / f"resid_post_layer_{LAYER}" / "trainer_0", LAYER, cache)
    save_sae(random_sae(MatryoshkaBatchTopKSAE(D, F, 8, [32, 96])), run / f"resid_post_layer_{LAYER}" / "trainer_1",
             LAYER, cache)
    export_run(run, "saelens", root / "export")
    out = root / "pages"
    assert main(["features", str(run), "--cache", str(cache), "--out", str(out), "--top", str(TOP), "--window", "4"]) == 0
    return {"root": root, "cache": cache, "run": run, "out": out, "export": root / "export"}


def read_layer(cache: Path, layer: int) -> dict[str, np.ndarray]:
    """Every stored token of a layer, with plain h5py (float32 cache: no bf16 decoding needed)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("acts", "seq", "pos", "tid", "reason", "norm", "median")}
    for shard in sorted((cache / "shards").glob("shard_*.h5")):
        with h5py.File(shard, "r") as h5:
            assert h5[f"layer_{layer}/activations"].attrs["dtype"] == "float32"
            parts["acts"].append(h5[f"layer_{layer}/activations"][:])
            parts["seq"].append(h5["tokens/sequence"][:])
            parts["pos"].append(h5["tokens/position"][:])
            parts["tid"].append(h5["tokens/token_id"][:])
            parts["reason"].append(h5[f"layer_{layer}/drop_reason"][:])
            parts["norm"].append(h5[f"layer_{layer}/norm"][:])
            batch = h5["tokens/batch"][:] - int(h5.attrs["first_batch"])
            parts["median"].append(h5[f"layer_{layer}/batch_median"][:][batch])
    return {k: np.concatenate(v) for k, v in parts.items()}


def brute_force_codes(folder: Path, acts_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The JumpReLU per-token code in float64 numpy from ae.pt's tensors, relu(pre) * (pre > threshold);
    the pre-activations; the threshold."""
    state = torch.load(folder / "ae.pt", weights_only=True)
    if "encoder.weight" in state:
        W_DF, b_F = state["encoder.weight"].numpy().T, state["encoder.bias"].numpy()
    else:
        W_DF, b_F = state["W_enc"].numpy(), state["b_enc"].numpy()
    threshold = float(state["threshold"])
    pre_NF = (acts_ND.astype(np.float64) - state["b_dec"].numpy()) @ W_DF.astype(np.float64) + b_F
    return np.maximum(pre_NF, 0) * (pre_NF > threshold), pre_NF, threshold


def load(out: Path, sub: str) -> dict:
    return json.loads((out / sub / "features.json").read_text())


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


# numpy float64 against torch's float32 nn.Linear: the codes agree within FP32_TOL of their scale (see
# conftest.FP32_TOL); an entry within that of the threshold may fire in one only.

@pytest.mark.parametrize("name", ["trainer_0", "trainer_1"])
def test_top_examples_frequencies_and_histograms_equal_brute_force(setup, name):
    doc = load(setup["out"], f"resid_post_layer_{LAYER}/{name}")
    t = read_layer(setup["cache"], LAYER)
    kept = t["reason"] == 0
    f_NF, pre_NF, threshold = brute_force_codes(setup["run"] / f"resid_post_layer_{LAYER}" / name, t["acts"][kept])
    scale = max(1.0, float(f_NF.max()))
    tol = FP32_TOL * scale
    assert doc["cache"]["kept_tokens"] == int(kept.sum())
    assert doc["cache"]["sink_tokens"] == int((t["reason"] == 2).sum()) > 20
    assert doc["cache"]["first_tokens_skipped"] == int((t["reason"] == 1).sum()) == 128
    assert "JumpReLU per token" in doc["sae"]["encode"] and len(doc["latents"]) == F
    fired = 0
    for lat in doc["latents"]:
        i, f_N = lat["id"], f_NF[:, lat["id"]]
        on_cut = int((np.abs(pre_NF[:, i] - threshold) <= tol).sum())
        assert abs(lat["fires"] - int((f_N > 0).sum())) <= on_cut, i
        assert lat["frequency"] == lat["fires"] / doc["cache"]["kept_tokens"]
        assert lat["mean_activation"] == pytest.approx(f_N.sum() / len(f_N), rel=1e-4, abs=tol)
        assert sum(lat["histogram"]["counts"]) == lat["fires"]
        if lat["fires"]:
            edges = np.asarray(lat["histogram"]["edges"])
            expected, _ = np.histogram(f_N[f_N > 0], bins=edges)
            # A value within rounding of a bin edge (float32 log2 against float64 edges) may sit in either bin.
            near_edge = int((np.abs(f_N[f_N > 0][:, None] - edges[None, :]) <= tol).any(axis=1).sum())
            assert np.abs(expected - np.asarray(lat["histogram"]["counts"])).sum() <= 2 * (on_cut + near_edge), i
        order = np.lexsort((np.arange(len(f_N)), -f_N))[:TOP]
        want = [(int(t["seq"][kept][r]), int(t["pos"][kept][r]), float(f_N[r])) for r in order if f_N[r] > 0]
        got = [(e["sequence"], e["position"], e["activation"]) for e in lat["examples"]]
        assert len(got) == len(want), i
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=tol)
        # The same tokens, except where two activations are within rounding of each other at the N-th place.
        nth = want[-1][2] if want else 0.0
        assert {w[:2] for w in want if w[2] > nth + tol} <= {g[:2] for g in got}, i
        assert lat["max_activation"] == (got[0][2] if got else 0.0)
        fired += bool(got)
    assert fired > F // 2


def test_the_context_is_the_rows_tokens_around_the_example_decoded(setup):
    from transformers import AutoTokenizer

    doc = load(setup["out"], f"resid_post_layer_{LAYER}/trainer_0")
    t = read_layer(setup["cache"], LAYER)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-qwen3"))
    where = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(t["seq"], t["pos"], strict=True))}
    checked = 0
    for lat in doc["latents"][:20]:
        for ex in lat["examples"]:
            ctx, r = ex["context"], where[(ex["sequence"], ex["position"])]
            same = [j for j in range(r - 4, r + 5) if 0 <= j < len(t["seq"]) and t["seq"][j] == t["seq"][r]]
            assert ctx["ids"] == t["tid"][same].tolist() and ctx["ids"][ctx["index"]] == ex["token_id"] == t["tid"][r]
            assert "".join(ctx["tokens"]) == tokenizer.decode(ctx["ids"], clean_up_tokenization_spaces=False)
            checked += 1
    assert checked > 100


def test_a_planted_sink_token_is_never_an_example_and_the_sink_report_counts_it(setup):
    doc = load(setup["out"], f"resid_post_layer_{LAYER}/trainer_0")
    t = read_layer(setup["cache"], LAYER)
    planted = set(sink_token_ids(resolve_model_path("embedded:tiny-qwen3")))
    sink = t["reason"] == 2
    assert set(t["tid"][sink].tolist()) == planted  # the embedded model's sinks are exactly its planted tokens
    sink_at = {(int(s), int(p)) for s, p in zip(t["seq"][sink], t["pos"][sink], strict=True)}
    examples = [ex for lat in doc["latents"] for ex in lat["examples"]]
    assert examples and not {ex["token_id"] for ex in examples} & planted
    assert not {(ex["sequence"], ex["position"]) for ex in examples} & sink_at
    by_token = {e["token_id"]: e["count"] for e in doc["sinks"]["by_token"]}
    assert by_token == {tid: int((t["tid"][sink] == tid).sum()) for tid in planted}
    f_SF, pre_SF, threshold = brute_force_codes(setup["run"] / f"resid_post_layer_{LAYER}" / "trainer_0", t["acts"][sink])
    tol = FP32_TOL * max(1.0, float(f_SF.max()))
    flagged = 0
    for lat in doc["latents"]:
        s = lat["sink"]
        f_S = f_SF[:, lat["id"]]
        assert abs(s["fires"] - int((f_S > 0).sum())) <= int((np.abs(pre_SF[:, lat["id"]] - threshold) <= tol).sum())
        assert s["max_activation"] == pytest.approx(float(f_S.max()), rel=0, abs=tol)
        if s["fires"]:
            assert s["max_at"]["token_id"] in planted and (s["max_at"]["sequence"], s["max_at"]["position"]) in sink_at
        assert s["dominates"] == (s["max_activation"] > lat["max_activation"])
        flagged += s["dominates"]
    # The planted sinks (norm ~300x the median) drive most latents of a random SAE far above any kept token.
    assert flagged > F // 4
    page = (setup["out"] / f"resid_post_layer_{LAYER}/trainer_0/latents/{next(lat['id'] for lat in doc['latents'] if lat['sink']['dominates'])}.html").read_text()
    assert 'id="sink-warning"' in page


def test_an_sae_recording_another_sink_multiple_is_refiltered_with_it(setup, tmp_path):
    """Multiple 2: the tokens above 2x the batch median, sinks or not, are dropped, as training dropped them."""
    folder = save_sae(random_sae(BatchTopKSAE(D, F, 8)), tmp_path / "sae", LAYER, setup["cache"], sink_multiple=2.0)
    assert main(["features", str(folder), "--cache", str(setup["cache"]), "--out", str(tmp_path / "out"), "--top", "5"]) == 0
    doc = load(tmp_path, "out")
    t = read_layer(setup["cache"], LAYER)
    first = t["reason"] == 1
    sink = t["norm"] > 2.0 * t["median"]
    assert doc["cache"]["sink_multiple"] == 2.0 and doc["cache"]["filter_source"] == "sae config"
    assert doc["cache"]["kept_tokens"] == int((~first & ~sink).sum())
    assert doc["cache"]["sink_tokens"] == int((~first & sink).sum()) > int((t["reason"] == 2).sum())
    dropped = {(int(s), int(p)) for s, p in zip(t["seq"][sink], t["pos"][sink], strict=True)}
    assert not {(ex["sequence"], ex["position"]) for lat in doc["latents"] for ex in lat["examples"]} & dropped


def test_both_formats_give_the_same_examples_and_each_sae_gets_its_folder(setup, tmp_path):
    assert main(["features", str(setup["export"]), "--cache", str(setup["cache"]), "--out", str(tmp_path / "out"),
                 "--top", str(TOP), "--window", "4"]) == 0
    ours = load(setup["out"], f"resid_post_layer_{LAYER}/trainer_0")
    theirs = load(tmp_path / "out", f"blocks.{LAYER}.hook_resid_post/trainer_0")
    assert theirs["sae"]["format"] == "saelens" and theirs["cache"]["kept_tokens"] == ours["cache"]["kept_tokens"]
    for a, b in zip(ours["latents"], theirs["latents"], strict=True):
        # nn.Linear (dictionary_learning module) against a matmul plus bias (InferenceSAE): fp32 rounding apart
        assert len(a["examples"]) == len(b["examples"])
        np.testing.assert_allclose([e["activation"] for e in a["examples"]], [e["activation"] for e in b["examples"]],
                                   rtol=0, atol=FP32_TOL * max(1.0, a["max_activation"]))
    index = (tmp_path / "out" / "index.html").read_text()
    assert f'href="blocks.{LAYER}.hook_resid_post/trainer_0/index.html"' in index
    assert (setup["out"] / "index.html").is_file() and (setup["out"] / f"resid_post_layer_{LAYER}/trainer_1/latents/{F - 1}.html").is_file()


def test_no_page_loads_anything_from_outside(setup):
    pages = list(setup["out"].rglob("*.html"))
    assert len(pages) == 2 * (F + 1) + 1
    for page in pages:
        text = page.read_text()
        assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text, re.I), page
        assert not re.search(r"url\(|@import|<link|<iframe|<img", text, re.I), page


def test_output_token_effects_are_the_decoder_direction_through_the_unembedding(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = setup["run"] / f"resid_post_layer_{LAYER}" / "trainer_0"
    assert main(["features", str(folder), "--cache", str(setup["cache"]), "--out", str(tmp_path / "out"), "--top", "3",
                 "--recipe", str(DEMO)]) == 0
    doc = load(tmp_path, "out")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-qwen3"))
    W_U_VD = model.lm_head.weight.detach().double().numpy()
    g_D = model.model.norm.weight.detach().double().numpy()  # Qwen3's RMSNorm multiplies by its weight
    W_dec_FD = torch.load(folder / "ae.pt", weights_only=True)["decoder.weight"].double().numpy().T
    logits_FV = (W_dec_FD * g_D) @ W_U_VD.T
    assert doc["effects"]["model"] == "embedded:tiny-qwen3"
    for lat in doc["latents"]:
        row = logits_FV[lat["id"]]
        pos, neg = lat["effects"]["positive"], lat["effects"]["negative"]
        assert [e["token_id"] for e in pos] == np.argsort(-row, kind="stable")[:10].tolist()
        assert [e["token_id"] for e in neg] == np.argsort(row, kind="stable")[:10].tolist()
        np.testing.assert_allclose([e["logit"] for e in pos], np.sort(row)[::-1][:10], rtol=1e-4)
    assert "Output-token effects" in (tmp_path / "out" / "latents" / "0.html").read_text()


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def test_every_user_error_is_one_line_and_earlier_output_is_kept(setup, tmp_path, capsys):
    out, cache = setup["out"], str(setup["cache"])
    before = digest(out)
    sae = str(setup["run"] / f"resid_post_layer_{LAYER}" / "trainer_0")
    wrong_layer = save_sae(random_sae(BatchTopKSAE(D, F, 8)), tmp_path / "layer1", 1, setup["cache"])
    narrow = save_sae(random_sae(BatchTopKSAE(32, F, 8)), tmp_path / "narrow", LAYER, setup["cache"])
    uncalibrated = save_sae(random_sae(BatchTopKSAE(D, F, 8), threshold=-1.0), tmp_path / "uncalibrated", LAYER, setup["cache"])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (["features", str(tmp_path / "nope"), "--cache", cache, "--out", str(out)], "is not a directory"),
        (["features", sae, "--cache", str(tmp_path / "nocache"), "--out", str(out)], "no activation cache at"),
        (["features", str(wrong_layer), "--cache", cache, "--out", str(out)], "has no layer 1 (it has [2, 3])"),
        (["features", str(narrow), "--cache", cache, "--out", str(out)], "has d_model 64, but"),
        (["features", str(uncalibrated), "--cache", cache, "--out", str(out)], "run `workbench threshold"),
        (["features", sae, "--cache", cache, "--out", str(a_file)], "is a file"),
        (["features", sae, "--cache", cache, "--out", str(foreign)], "is not empty and was not written by `workbench features`"),
        (["features", sae, "--cache", cache, "--out", str(out), "--layer", "3"], "--layer 3 contradicts it"),
        (["features", sae, "--cache", cache, "--out", str(out), "--top", "0"], "must be a positive integer"),
        (["features", sae, "--cache", cache, "--out", str(out), "--recipe", str(REPO / "recipes/qwen3-8b-batchtopk.yaml")],
         "the recipe's model.name is Qwen/Qwen3-8B"),
    ]
    for argv, message in cases:
        assert message in refused(capsys, argv), argv
    assert digest(out) == before
    assert a_file.read_text() == "not a folder" and (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_rerun_rewrites_its_own_output_and_removes_stale_pages(setup, tmp_path):
    cache = str(setup["cache"])
    folder = setup["run"] / f"resid_post_layer_{LAYER}" / "trainer_0"
    out = tmp_path / "out"
    assert main(["features", str(folder), "--cache", cache, "--out", str(out), "--top", "3"]) == 0
    first = load(tmp_path, "out")
    (out / "latents" / f"{F + 5}.html").write_text("left by an earlier, wider SAE")
    marker = json.loads((out / ".workbench-output.json").read_text())
    marker["files"].append(f"latents/{F + 5}.html")
    (out / ".workbench-output.json").write_text(json.dumps(marker))
    assert main(["features", str(folder), "--cache", cache, "--out", str(out), "--top", "3"]) == 0
    assert load(tmp_path, "out") == first
    assert not (out / "latents" / f"{F + 5}.html").exists() and len(list((out / "latents").iterdir())) == F
