"""`workbench train` end to end on a cache collected from the demo model: the output layout and
config.json, the quality of the SAEs, resume after kill -9, 2 processes against 1, recipe errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    FP32_TOL,
    accelerate_two_cpu_processes,
    assert_close_to_scale,
    assert_codes_close,
    smallest_kept,
)

from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import convert, load_trainable
from workbench.sae import BatchTopKSAE
from workbench.training import read_metrics, train

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
SAES = [{"name": "btk", "arch": "batchtopk", "width": 256, "k": 8},
        {"name": "mat", "arch": "matryoshka", "width": 256, "k": 8, "group_fractions": [0.125, 0.375, 0.5]}]
# dictionary_learning's trainer keys, in its order (Matryoshka: group keys after dict_size)
TRAINER_KEYS = ["trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start",
                "threshold_beta", "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size", "k",
                "device", "layer", "lm_name", "wandb_name", "submodule_name"]
BUFFER_KEYS = ["d_submodule", "io", "n_ctxs", "ctx_len", "refresh_batch_size", "out_batch_size", "device"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """32,768 tokens of the demo corpus through the demo model, layers 2 and 3."""
    out = tmp_path_factory.mktemp("train_cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=32768",
                                                          "data.context_length=64"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train) -> Path:
    """A recipe on the demo one, training layer 2 of `cache` into `out` (4096 tokens held out)."""
    section = {"cache": str(cache), "layers": [LAYER], "saes": SAES, "batch_size": 256, "num_tokens": 256 * 800,
               "warmup_steps": 50, "threshold_start_step": 50, "threshold_beta": 0.99, "eval_tokens": 4096,
               "checkpoint_every": 1000, "out": str(out)} | train
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": section}))
    return path


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """Both architectures on layer 2, 800 steps of 256 tokens (about 7 passes over the training split)."""
    root = tmp_path_factory.mktemp("trained")
    train(load_recipe(write_recipe(root / "recipe.yaml", cache, root / "saes")))
    return root / "saes" / f"resid_post_layer_{LAYER}"


def test_output_layout_and_config_sections(trained, cache):
    for sae in SAES:
        folder = trained / sae["name"]
        assert {p.name for p in folder.iterdir()} == {"ae.pt", "config.json", "eval_results.json", "metrics.jsonl",
                                                      "training_curves.png"}
        assert (folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        config = json.loads((folder / "config.json").read_text())
        assert list(config) == ["trainer", "buffer", "workbench"]
        keys = list(config["trainer"])
        if sae["arch"] == "matryoshka":
            assert keys[13:16] == ["group_fractions", "group_weights", "group_sizes"]
            assert config["trainer"]["group_sizes"] == [32, 96, 128]
            keys = keys[:13] + keys[16:]
        assert keys == TRAINER_KEYS
        assert config["trainer"]["k"] == sae["k"] and config["trainer"]["dict_size"] == sae["width"]
        assert config["trainer"]["layer"] == LAYER and config["trainer"]["lm_name"] == "embedded:tiny-qwen3"
        assert config["trainer"]["lr"] == pytest.approx(2e-4 / (256 / 2**14) ** 0.5)
        assert list(config["buffer"]) == BUFFER_KEYS
        assert config["buffer"]["ctx_len"] == 64 and config["buffer"]["d_submodule"] == 64
        extra = config["workbench"]
        assert extra["sink_multiple"] == 10.0 and extra["sink_median"] == "real" and extra["drop_first_token"] is True
        assert extra["cache"] == str(cache.resolve()) and extra["cache_fingerprint"]
        assert extra["tokens_trained"] == 800 * 256 and extra["k_anneal_steps"] == 8
        kept = json.loads((cache / "manifest.json").read_text())["summary"]["layers"][str(LAYER)]["kept"]
        assert extra["holdout_fraction"] == pytest.approx(4096 / kept)
        assert extra["norm_factor"] > 0 and extra["arch"] == sae["arch"] and extra["model"] == "embedded:tiny-qwen3"


def test_sae_reaches_a_good_fve_with_l0_k_in_training_and_near_k_with_the_threshold(trained):
    for sae in SAES:
        rows = read_metrics(trained / sae["name"] / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 801))
        after_anneal = [r for r in rows if r["step"] > 8]
        assert {r["l0"] for r in after_anneal} == {float(sae["k"])}
        assert [r["k"] for r in rows[:9]] == [64 - (64 - 8) * s // 8 for s in range(9)]
        assert rows[-1]["frac_variance_explained"] > 0.7
        results = json.loads((trained / sae["name"] / "eval_results.json").read_text())
        assert results["frac_variance_explained"] > 0.7  # held-out tokens, threshold path
        assert results["l0_batch_topk"] == sae["k"]
        assert abs(results["l0"] - sae["k"]) < 0.1 * sae["k"]
        assert results["hyperparameters"] == {"n_inputs": 4096, "context_length": 64}
        assert set(results) >= {"l2_loss", "l1_loss", "l0", "frac_variance_explained", "cossim", "l2_ratio",
                                "relative_reconstruction_bias", "frac_alive", "mse", "dead_latents"}


def test_a_finished_layer_is_not_trained_again(trained, capsys):
    recipe = load_recipe(trained.parents[1] / "recipe.yaml")
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("ae.pt")}
    train(recipe)
    assert "already trained" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in trained.rglob("ae.pt")}


def run_cli(args: list[str], **env) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "ae.pt", weights_only=True)


def test_resume_after_kill_9_ends_with_the_same_weights(cache, tmp_path):
    short = dict(num_tokens=256 * 300, checkpoint_every=25)
    train(load_recipe(write_recipe(tmp_path / "straight.yaml", cache, tmp_path / "straight", **short)))
    recipe = write_recipe(tmp_path / "killed.yaml", cache, tmp_path / "killed", **short)
    checkpoint = tmp_path / "killed" / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    proc = run_cli([sys.executable, "-m", "workbench", "train", str(recipe)])
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]  # plain tensors and numbers
    assert 0 < killed_at < 300

    resumed = run_cli([sys.executable, "-m", "workbench", "train", str(recipe)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert not checkpoint.exists()
    for sae in SAES:
        a, b = state(tmp_path / "straight" / f"resid_post_layer_{LAYER}" / sae["name"]), state(checkpoint.parent / sae["name"])
        # Bit for bit: the resumed run restores copies (weights, Adam moments, reader and RNG state) and runs
        # the same code on the same batches with one thread, as the straight run did.
        for name in a:
            assert torch.equal(a[name], b[name]), name
        drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
        assert drop(read_metrics(checkpoint.parent / sae["name"] / "metrics.jsonl")) == \
            drop(read_metrics(tmp_path / "straight" / f"resid_post_layer_{LAYER}" / sae["name"] / "metrics.jsonl"))


def test_two_processes_give_the_same_saes_as_one(cache, tmp_path):
    short = dict(num_tokens=256 * 120, warmup_steps=20, threshold_start_step=20)
    train(load_recipe(write_recipe(tmp_path / "one.yaml", cache, tmp_path / "one", **short)))
    launch, env = accelerate_two_cpu_processes(tmp_path)
    two = run_cli([*launch, "train", str(write_recipe(tmp_path / "two.yaml", cache, tmp_path / "two", **short))], **env)
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    launch, env = accelerate_two_cpu_processes(tmp_path)
    bad = run_cli([*launch, "train", str(write_recipe(tmp_path / "bad.yaml", cache, tmp_path / "bad", data_lanes=3, batch_size=255,
                                             **short))], **env)
    _, bad_err = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "train.data_lanes (3) must be a multiple of the number of processes (2)" in bad_err
    for sae in SAES:
        one_dir, two_dir = (tmp_path / run / f"resid_post_layer_{LAYER}" / sae["name"] for run in ("one", "two"))
        a, b = state(one_dir), state(two_dir)
        # Two processes encode half batches and all-reduce their gradients: every sum is reassociated. The
        # same 120 steps on one process with the batch rows reordered, or with every starting weight moved by
        # 2e-7 relative, end within 2.4e-7 of each other (measured, both architectures): 1/40 of atol. A
        # latent flipping at the batch top-k cut would differ by a whole Adam step (~1e-3) and fail this.
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
        assert float(a["threshold"]) > 0
        ones, twos = read_metrics(one_dir / "metrics.jsonl"), read_metrics(two_dir / "metrics.jsonl")
        # Counts, not sums: k x B latents are kept a step whichever ones they are, and no latent goes dead in
        # 120 steps (dead_feature_threshold 10M tokens), so these are exact whatever the rounding.
        assert [r["dead"] for r in ones] == [r["dead"] for r in twos] and [r["l0"] for r in ones] == [r["l0"] for r in twos]


def test_recipe_errors_are_one_clear_line(cache, trained, tmp_path):
    cases = [
        (dict(num_tokens=256 * 40), "not more than train.warmup_steps"),
        (dict(decay_start=0.01), "decay_start resolves to step"),
        (dict(init_from=str(tmp_path / "nowhere")), "has no ae.pt"),
        (dict(init_from=str(trained / "btk"), saes=[SAES[0] | {"k": 4}]), "k 8 != train.saes btk.k 4"),
        (dict(init_from=str(trained / "btk"), saes=[SAES[0] | {"width": 512}]), "width 256 != train.saes btk.width 512"),
        (dict(init_from=str(trained / "btk"), saes=[SAES[1] | {"name": "btk"}]), "it is a BatchTopKSAE, the recipe says arch matryoshka"),
        (dict(init_from=str(trained.parent), saes=[SAES[1] | {"group_fractions": [0.5, 0.5]}]),  # a series folder
         r"resid_post_layer_2/mat: group sizes \[32, 96, 128\] != \[128, 128\]"),
        (dict(layers=[7]), "layer 7 is not in the cache"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(WorkbenchError, match=message):
            train(load_recipe(write_recipe(tmp_path / f"r{i}.yaml", cache, tmp_path / f"o{i}", **overrides)))
    saelens_sae = tmp_path / "saelens_sae"
    saelens_sae.mkdir()
    (saelens_sae / saelens.CFG_FILE).write_text("{}")  # no weights file beside it
    with pytest.raises(WorkbenchError, match="has cfg.json but no sae_weights.safetensors"):
        train(load_recipe(write_recipe(tmp_path / "s.yaml", cache, tmp_path / "s", init_from=str(saelens_sae))))
    with pytest.raises(WorkbenchError, match="must be a multiple of train.data_lanes"):
        load_recipe(write_recipe(tmp_path / "lanes.yaml", cache, tmp_path / "l", batch_size=100))


def test_a_checkpoint_of_another_recipe_is_refused(cache, tmp_path):
    recipe = write_recipe(tmp_path / "a.yaml", cache, tmp_path / "out")
    layer_dir = tmp_path / "out" / f"resid_post_layer_{LAYER}"
    layer_dir.mkdir(parents=True)
    torch.save({"fingerprint": "something else", "step": 3}, layer_dir / "checkpoint.pt")
    with pytest.raises(WorkbenchError, match="different train recipe"):
        train(load_recipe(recipe))


def test_d_model_mismatch_is_refused(cache, tmp_path):
    folder = tmp_path / "wide"
    sae = BatchTopKSAE(32, 256, 8)
    dl.save_folder(sae, folder, {"trainer": {"dict_class": "BatchTopKSAE", "k": 8}})
    with pytest.raises(WorkbenchError, match="d_model 32 != the cache's 64"):
        train(load_recipe(write_recipe(tmp_path / "r.yaml", cache, tmp_path / "o", init_from=str(folder), saes=[SAES[0]])))


REFERENCE = Path(__file__).parent / "reference" / "dl_ref.py"


def run_reference(command: str, spec, workdir: Path, out: Path | None = None):
    """tests/reference/dl_ref.py in a subprocess (dictionary_learning patches torch when imported)."""
    src, out = workdir / f"{command}_in.pt", out or workdir / f"{command}_out.pt"
    torch.save(spec, src)
    proc = subprocess.run([sys.executable, str(REFERENCE), command, str(src), str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return None if command == "write" else torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def published(cache, tmp_path_factory) -> Path:
    """A folder written by dictionary_learning itself: BatchTopKTrainer, 40 updates on normalised cache
    activations, then config.json and ae.pt (biases folded) as its trainSAE writes them."""
    from workbench.cache import ActivationCache

    root = tmp_path_factory.mktemp("published")
    with ActivationCache(cache) as c:
        batches = torch.stack([x for _, x in zip(range(40), c.batches(LAYER, 256, seed=5), strict=False)])
    norm_factor = batches.pow(2).sum(-1).mean().sqrt().item()
    spec = dict(arch="batchtopk", steps=40, activation_dim=64, dict_size=256, k=8, warmup_steps=5,
                threshold_start_step=10, layer=LAYER, lm_name="embedded:tiny-qwen3", batches=batches,
                norm_factor=norm_factor, buffer={"d_submodule": 64, "io": "out", "n_ctxs": 512, "ctx_len": 64,
                                                 "refresh_batch_size": 16, "out_batch_size": 256, "device": "cpu"})
    run_reference("write", spec, root, out=root / "trainer_0")
    return root / "trainer_0"


@pytest.fixture(scope="module")
def fine_tuned(cache, published, tmp_path_factory) -> Path:
    """The published SAE fine-tuned by the workbench with a vanishing learning rate: what it keeps shows."""
    root = tmp_path_factory.mktemp("fine_tuned")
    recipe = write_recipe(root / "recipe.yaml", cache, root / "saes", init_from=str(published), saes=[SAES[0]],
                          lr=1e-10, num_tokens=256 * 100, warmup_steps=0, threshold_start_step=0, k_anneal_steps=0.5)
    train(load_recipe(recipe))
    return root / "saes" / f"resid_post_layer_{LAYER}" / "btk"


def test_a_dictionary_learning_folder_fine_tunes_keeping_its_weights_and_threshold(published, fine_tuned):
    before, after = state(published), state(fine_tuned)
    assert before.keys() == after.keys()
    for name in ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"):  # b_dec: no geometric-median re-init
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(after["k"]) == 8
    rows = read_metrics(fine_tuned / "metrics.jsonl")
    assert {r["k"] for r in rows} == {8}  # no k annealing from d_model, although the recipe asks for it
    threshold_before, threshold_after = float(before["threshold"]), float(after["threshold"])
    assert threshold_before > 0 and threshold_after != threshold_before
    assert abs(threshold_after - threshold_before) < 0.2 * threshold_before  # an EMA continued, not restarted
    extra = json.loads((fine_tuned / "config.json").read_text())["workbench"]
    assert extra["init_from"] == str(published) and extra["k_anneal_steps"] is None


def test_a_saelens_folder_fine_tunes_from_exactly_the_weights_of_its_dictionary_learning_source(cache, published, tmp_path):
    """init_from a SAELens folder: the published SAE converted, its cfg.json stripped of the training k (the
    recipe's k stands in). Two steps from it end bit for bit where two steps from the published folder end."""
    source = tmp_path / "saelens"
    convert(published, "saelens", source)
    cfg = json.loads((source / saelens.CFG_FILE).read_text())
    del cfg["metadata"]["training_architecture_details"]["k"]
    (source / saelens.CFG_FILE).write_text(json.dumps(cfg))
    short = dict(saes=[SAES[0]], lr=1e-10, num_tokens=256 * 2, warmup_steps=0, threshold_start_step=0)
    # Bit for bit below, because both runs start from the same module: the conversions copy the tensors, and
    # both land in contiguous parameters of a BatchTopKSAE, so the two runs are the same computation.
    start_dl, start_saelens = load_trainable(published), load_trainable(source, k=8)
    assert type(start_dl) is type(start_saelens) is BatchTopKSAE
    for (name, a), b in zip(start_dl.state_dict().items(), start_saelens.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype, name
    ends = {}
    for name, init_from in (("dl", published), ("saelens", source)):
        train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", cache, tmp_path / name, init_from=str(init_from), **short)))
        ends[name] = state(tmp_path / name / f"resid_post_layer_{LAYER}" / "btk")
    before = state(published)
    assert ends["saelens"].keys() == before.keys() and int(ends["saelens"]["k"]) == 8
    for name in before:
        assert torch.equal(ends["saelens"][name], ends["dl"][name]), name
    for name in ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"):
        torch.testing.assert_close(ends["saelens"][name], before[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_written_folder_loads_in_dictionary_learning_with_the_same_outputs(trained, fine_tuned, cache):
    from workbench.cache import ActivationCache
    from workbench.metrics import evaluate_sae

    with ActivationCache(cache) as c:
        x_ND = next(c.batches(LAYER, 512, shuffle=False, split="holdout", holdout_fraction=0.2))
    folders = [trained / "btk", trained / "mat", fine_tuned]
    saes, inputs = [], []
    for folder in folders:
        sae, config = dl.load_folder(folder)
        with torch.no_grad():
            pre_ND = sae.pre_acts(x_ND)
        # Tokens with a latent on the threshold (within FP32_TOL of the scale) are left out: there the last
        # bit of rounding, which differs between the libraries, decides whether it fires, and that moves
        # evaluate's l0 by 1/512 and its losses by more than 1e-5. Rounding moves a pre-activation by <= 3e-7
        # of the scale, so on the other tokens both libraries fire the same latents.
        near_N = ((pre_ND - sae.threshold).abs() <= FP32_TOL * max(1.0, float(pre_ND.abs().max()))).any(dim=1)
        assert int(near_N.sum()) <= 16, f"{folder}: {int(near_N.sum())} of 512 tokens on the threshold"
        saes.append((sae, config))
        inputs.append(x_ND[~near_N])
    reference = run_reference("load", [{"folder": str(f), "x": x, "eval_batch": 128} for f, x in zip(folders, inputs, strict=True)],
                              fine_tuned.parent)
    for folder, (sae, config), x_ND, ref in zip(folders, saes, inputs, reference, strict=True):
        assert ref["dict_class"] == type(sae).__name__ and ref["config"] == config
        # Another library's code: equal to fp32 rounding (conftest.FP32_TOL), a latent on the batch top-k
        # cut aside (no latent is on the threshold, see above: no flip is allowed there).
        with torch.no_grad():
            f_ND = sae.encode(x_ND)
            assert_codes_close(f_ND, ref["f_threshold"], sae.threshold, max_flips=0, what=f"{folder} threshold")
            assert_codes_close(sae.encode(x_ND, use_threshold=False), ref["f_topk"], smallest_kept(ref["f_topk"]),
                               what=f"{folder} batch top-k")
            assert_close_to_scale(sae(x_ND), ref["x_hat"], what=f"{folder} forward")
        assert (f_ND != 0).any()
        ours = evaluate_sae(sae, x_ND.split(128))
        for key, value in ref["eval"].items():  # metrics.evaluate_sae == dictionary_learning's evaluate
            # the same latents fire on both sides, so the counts are equal and the losses agree to fp32
            # rounding of their sums (~1e-7 relative)
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_checkpoint_with_foreign_read_positions_is_one_clear_error(cache, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", num_tokens=256 * 100,
                                      checkpoint_every=50))
    from workbench.training.loop import global_batches, layer_plans

    plan = layer_plans(recipe)[LAYER]
    with pytest.raises(WorkbenchError, match=r"records read positions for lanes \[0, 1\], not the 8 of train.data_lanes"):
        next(global_batches(cache, LAYER, [0], recipe.train, plan, 50, {0: {}, 1: {}}))
