"""`workbench train` with train.algorithm saelens on a cache of the demo model: the loop drives
SAELensTrainer (tests/test_saelens_trainer_parity.py proves the step against sae-lens), folds what SAELens'
fit() and save_inference_model fold, records the algorithm, resumes after kill -9 to the same bits, and the
SAELens export loads with SAE.load_from_disk with the same outputs."""

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
from conftest import assert_close_to_scale

from workbench.cache import ActivationCache
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.export import export_run
from workbench.formats import saelens
from workbench.formats.convert import convert, load_trainable
from workbench.training import read_metrics, train

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
SAES = [{"name": "btk", "arch": "batchtopk", "width": 256, "k": 8},
        {"name": "mat", "arch": "matryoshka", "width": 256, "k": 8, "group_fractions": [0.125, 0.375, 0.5]}]
# The demo recipe's dictionary_learning settings back at their defaults (the saelens algorithm refuses them).
DL_DEFAULTS = {"warmup_steps": 1000, "threshold_start_step": 1000}
SAELENS = {"lr": 1e-3, "dead_feature_window": 50, "normalize_activations": "expected_average_only_in",
           "n_batches_for_norm_estimate": 20, "lr_decay_steps": 50}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """32,768 tokens of the demo corpus through the demo model, layers 2 and 3."""
    out = tmp_path_factory.mktemp("saelens_cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=32768",
                                                          "data.context_length=64"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train_keys) -> Path:
    section = {"algorithm": "saelens", "saelens": SAELENS, "cache": str(cache), "layers": [LAYER], "saes": SAES,
               "batch_size": 256, "num_tokens": 256 * 300, "eval_tokens": 4096, "checkpoint_every": 1000,
               "out": str(out), **DL_DEFAULTS} | train_keys
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": section}))
    return path


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saelens_trained")
    train(load_recipe(write_recipe(root / "recipe.yaml", cache, root / "saes")))
    return root / "saes" / f"resid_post_layer_{LAYER}"


def test_the_folder_records_the_algorithm_and_holds_the_folded_inference_sae(trained):
    for cfg in SAES:
        folder = trained / cfg["name"]
        section = json.loads((folder / "config.json").read_text())["workbench"]
        assert section["algorithm"] == "saelens" and section["saelens"]["dead_feature_window"] == 50
        assert section["saelens"]["rescale_acts_by_decoder_norm"] is True and section["normalize_activations"] is True
        sae = load_trainable(folder)
        # save_inference_model's fold: unit decoder rows; the threshold is the trained topk_threshold in raw
        # units (the last logged value is in scaled units: x / norm_factor)
        torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(cfg["width"]), rtol=0, atol=1e-6)
        last = read_metrics(folder / "metrics.jsonl")[-1]
        assert last["step"] == 300 and last["lr"] < 1e-3  # the lr decays over the last 50 steps
        assert float(sae.threshold) == pytest.approx(last["threshold"] * section["norm_factor"], rel=1e-6)


def test_the_sae_learned_and_its_threshold_gives_about_k(trained):
    for cfg in SAES:
        results = json.loads((trained / cfg["name"] / "eval_results.json").read_text())
        assert results["frac_variance_explained_batch_topk"] > 0.8, results
        assert results["l0_batch_topk"] == pytest.approx(cfg["k"], rel=0.01)
        assert results["l0"] == pytest.approx(cfg["k"], rel=0.5)  # the EMA threshold, per token


def test_the_norm_factor_is_saelens_expected_average(trained, cache):
    """norm_factor = mean ||x|| / sqrt(d) over the first n_batches_for_norm_estimate training batches."""
    section = json.loads((trained / "btk" / "config.json").read_text())["workbench"]
    with ActivationCache(cache) as c:
        stream = c.batches(LAYER, 256, seed=0, holdout_fraction=section["holdout_fraction"])
        norms = torch.cat([next(stream).norm(dim=-1) for _ in range(20)])
        expected = norms.mean().item() / c.d_model**0.5
    assert section["norm_factor"] == pytest.approx(expected, rel=1e-6)


def test_the_saelens_export_loads_in_saelens_with_the_same_outputs(trained, tmp_path, cache):
    out = tmp_path / "sl"
    convert(trained / "mat", "saelens", out)
    cfg = json.loads((out / saelens.CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu"
    details = cfg["metadata"]["training_architecture_details"]
    assert details["k"] == 8 and details["matryoshka_widths"] == [32, 128, 256]
    with ActivationCache(cache) as c:
        x_BD = next(c.batches(LAYER, 512, shuffle=False))
    ours = load_trainable(trained / "mat")
    with torch.no_grad():
        f_ours, x_hat_ours = ours.encode(x_BD), ours(x_BD)
    script = ("import sys, torch; from sae_lens import SAE; torch.set_grad_enabled(False); sae = SAE.load_from_disk(sys.argv[1], device='cpu'); "
              "x = torch.load(sys.argv[2]); f = sae.encode(x); torch.save({'f': f, 'x_hat': sae.decode(f)}, sys.argv[3])")
    torch.save(x_BD, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "y.pt", weights_only=True)
    assert_close_to_scale(theirs["f"], f_ours)
    assert_close_to_scale(theirs["x_hat"], x_hat_ours)


def test_resume_after_kill_9_ends_with_the_same_weights(cache, tmp_path):
    short = dict(checkpoint_every=25)
    train(load_recipe(write_recipe(tmp_path / "straight.yaml", cache, tmp_path / "straight", **short)))
    recipe = write_recipe(tmp_path / "killed.yaml", cache, tmp_path / "killed", **short)
    checkpoint = tmp_path / "killed" / f"resid_post_layer_{LAYER}" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", str(recipe)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < 300
    train(load_recipe(recipe))
    assert not checkpoint.exists()
    for cfg in SAES:
        a = torch.load(tmp_path / "straight" / f"resid_post_layer_{LAYER}" / cfg["name"] / "ae.pt", weights_only=True)
        b = torch.load(checkpoint.parent / cfg["name"] / "ae.pt", weights_only=True)
        for name in a:  # copies restored (weights, Adam, the lr schedule, counters, topk_threshold, reader): bit for bit
            assert torch.equal(a[name], b[name]), name


# SAELens' save_inference_model from the same training config, in its own process: the config the SAE was
# trained with (the workbench section's `saelens`), the metadata the workbench knows set as SAELens' runner sets
# it, fit()'s fold of the activation scaling.
SAVE_INFERENCE = """
import json, sys
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
spec = json.loads(sys.argv[1])
settings, meta = spec["settings"], spec["metadata"]
keys = dict(d_in=spec["d_in"], d_sae=spec["d_sae"], k=spec["k"], dtype="float32", device="cpu",
            normalize_activations=settings["normalize_activations"], decoder_init_norm=settings["decoder_init_norm"],
            aux_loss_coefficient=settings["aux_loss_coefficient"], topk_threshold_lr=settings["topk_threshold_lr"],
            rescale_acts_by_decoder_norm=settings["rescale_acts_by_decoder_norm"])
if spec["widths"]:
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(**keys, matryoshka_widths=spec["widths"],
                                               use_matryoshka_aux_loss=settings["use_matryoshka_aux_loss"])
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
else:
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**keys))
for key, value in meta.items():
    setattr(sae.cfg.metadata, key, value)
sae.fold_activation_norm_scaling_factor(spec["scaling_factor"])
sae.save_inference_model(sys.argv[2])
"""
# What SAELens' runner (_set_sae_metadata) and trainer (set_final_sae_metadata) put in the metadata before the save
RUNNER_METADATA = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path",
                   "model_from_pretrained_kwargs", "model_class_name", "seqpos_slice", "exclude_special_tokens", "l0",
                   "num_dead_features")


@pytest.mark.parametrize("name", [cfg["name"] for cfg in SAES])
def test_the_saelens_cfg_json_is_the_one_saelens_writes_from_the_same_training_config(trained, tmp_path, name):
    """Every field of cfg.json (metadata.training_architecture_details included) equals save_inference_model's,
    apart from the workbench's own metadata (its section, the dictionary_learning config it came from)."""
    out = tmp_path / "ours"
    convert(trained / name, "saelens", out)
    ours = json.loads((out / saelens.CFG_FILE).read_text())
    section = json.loads((trained / name / "config.json").read_text())["workbench"]
    details = ours["metadata"]["training_architecture_details"]
    spec = {"d_in": ours["d_in"], "d_sae": ours["d_sae"], "k": details["k"], "widths": details.get("matryoshka_widths"),
            "settings": section["saelens"], "scaling_factor": 1 / section["norm_factor"],
            "metadata": {key: ours["metadata"][key] for key in RUNNER_METADATA}}
    proc = subprocess.run([sys.executable, "-c", SAVE_INFERENCE, json.dumps(spec), str(tmp_path / "theirs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads((tmp_path / "theirs" / saelens.CFG_FILE).read_text())
    ours_meta = {key: value for key, value in ours.pop("metadata").items() if key not in ("workbench", "converted_from")}
    theirs_meta = theirs.pop("metadata")
    assert ours == theirs
    assert ours_meta == theirs_meta
    assert theirs_meta["training_architecture"] == ("matryoshka_batchtopk" if name == "mat" else "batchtopk")
    assert theirs_meta["training_architecture_details"]["topk_threshold_lr"] == 0.01
    assert theirs["normalize_activations"] == "none"  # fit() folded expected_average_only_in
    evals = json.loads((trained / name / "eval_results.json").read_text())
    assert (ours_meta["l0"], ours_meta["num_dead_features"]) == (evals["l0_batch_topk"], evals["dead_latents_training"])
    assert ours_meta["seqpos_slice"] == ([1, None] if section["drop_first_token"] else [None])


def test_the_dictionary_learning_export_gives_saelens_outputs(trained, cache, tmp_path):
    """The dictionary_learning format holds a SAELens-algorithm SAE whole (after the fold: one threshold, no
    run-time normalisation): load_dictionary on its export and SAE.load_from_disk on the SAELens export give
    the same codes and reconstructions, each library in its own process."""
    export_run(trained.parent, "dictionary_learning", tmp_path / "dl")
    export_run(trained.parent, "saelens", tmp_path / "sl")
    with ActivationCache(cache) as c:
        x_BD = next(c.batches(LAYER, 512, shuffle=False))
    dl_folders = {p.name: p for p in (tmp_path / "dl").glob(f"*/resid_post_layer_{LAYER}/*") if p.is_dir()}
    sl_folders = {p.name: p for p in (tmp_path / "sl").glob(f"blocks.{LAYER}.hook_resid_post/*") if p.is_dir()}
    assert sorted(dl_folders) == sorted(sl_folders) == sorted(cfg["name"] for cfg in SAES)
    names = sorted(dl_folders)
    theirs_dl = run_dl_reference([{"folder": str(dl_folders[n]), "x": x_BD, "eval_batch": 256} for n in names], tmp_path)
    torch.save(x_BD, tmp_path / "x.pt")
    for name, dl_out in zip(names, theirs_dl, strict=True):
        script = ("import sys, torch; from sae_lens import SAE; torch.set_grad_enabled(False); "
                  "sae = SAE.load_from_disk(sys.argv[1], device='cpu'); x = torch.load(sys.argv[2]); f = sae.encode(x); "
                  "torch.save({'f': f, 'x_hat': sae.decode(f)}, sys.argv[3])")
        proc = subprocess.run([sys.executable, "-c", script, str(sl_folders[name]), str(tmp_path / "x.pt"),
                               str(tmp_path / f"{name}.pt")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        sl_out = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert dl_out["dict_class"] == ("MatryoshkaBatchTopKSAE" if name == "mat" else "BatchTopKSAE")
        assert dl_out["k"] == 8 and bool((sl_out["f"] > 0).any())
        assert bool(((dl_out["f_threshold"] > 0) == (sl_out["f"] > 0)).all()), name  # the same latents fire
        assert_close_to_scale(dl_out["f_threshold"], sl_out["f"], what=f"{name} codes")
        assert_close_to_scale(dl_out["x_hat"], sl_out["x_hat"], what=f"{name} reconstructions")


def run_dl_reference(specs: list[dict], workdir: Path) -> list[dict]:
    """tests/reference/dl_ref.py load in a subprocess (dictionary_learning patches torch when imported)."""
    src, out = workdir / "dl_in.pt", workdir / "dl_out.pt"
    torch.save(specs, src)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "reference" / "dl_ref.py"), "load", str(src), str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


# ---- fine-tuning a published SAELens Matryoshka / BatchTopK folder ----

SAELENS_REF = REPO / "tests" / "reference" / "saelens_ref.py"
FINE_TUNE_STEPS = 100


def published(trained: Path, root: Path) -> Path:
    """The Matryoshka SAE as a published SAELens folder: a jumprelu cfg.json whose metadata says
    training_architecture and carries k and matryoshka_widths, nothing of the workbench's (its export's cfg.json
    is save_inference_model's, as the test above proves, plus the workbench's metadata, removed here)."""
    folder = root / "published"
    convert(trained / "mat", "saelens", folder)
    cfg = json.loads((folder / saelens.CFG_FILE).read_text())
    for key in ("workbench", "converted_from"):
        cfg["metadata"].pop(key, None)
    (folder / saelens.CFG_FILE).write_text(json.dumps(cfg))
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    return folder


def test_fine_tuning_a_published_folder_continues_as_saelens_training_from_its_state(trained, cache, tmp_path):
    """SAELensTrainer from a published folder (fine_tune) starts from its tensors with topk_threshold = its
    threshold, and then trains bit for bit as SAETrainer.fit() on SAELens' Matryoshka training SAE holding that
    state, on the same batches (SAELens' own from_pretrained_path would load the folder as a JumpReLU training
    SAE: this is the training it reproduces)."""
    from safetensors.torch import load_file

    from workbench.config import SAELensTrainConfig
    from workbench.training.saelens_step import SAELensTrainer

    folder = published(trained, tmp_path)
    saved = load_file(folder / saelens.WEIGHTS_FILE)
    with ActivationCache(cache) as c:
        stream = c.batches(LAYER, 256, seed=1)
        data = torch.stack([next(stream) for _ in range(FINE_TUNE_STEPS)])
    settings = SAELensTrainConfig(lr=1e-3, dead_feature_window=20, lr_decay_steps=20)
    trainer = SAELensTrainer(load_trainable(folder), FINE_TUNE_STEPS, settings, fine_tune=True)
    start = trainer.training_state()
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(start[key], saved[key]), key
    assert float(start["topk_threshold"]) == float(saved["threshold"][0]) > 0
    logs = [trainer.update(x_BD, log=True) for x_BD in data]
    widths = json.loads((folder / saelens.CFG_FILE).read_text())["metadata"]["training_architecture_details"]["matryoshka_widths"]
    sae_keys = {key: getattr(settings, key) for key in ("aux_loss_coefficient", "topk_threshold_lr", "decoder_init_norm",
                                                        "rescale_acts_by_decoder_norm", "use_matryoshka_aux_loss")}
    spec = {"arch": "matryoshka", "d_in": 64, "d_sae": 256, "k": 8, "widths": widths, "sae": sae_keys,
            "trainer": {"lr": settings.lr, "dead_feature_window": settings.dead_feature_window,
                        "lr_decay_steps": settings.lr_decay_steps},
            "state": start, "batches": data, "folder": str(tmp_path / "theirs")}
    torch.save([spec], tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, str(SAELENS_REF), "train", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ref,) = torch.load(tmp_path / "out.pt", weights_only=False)
    ours = trainer.training_state()
    for key, value in ours.items():
        assert torch.equal(value, ref["state"][key]), key
    assert torch.equal(trainer.n_forward_passes_since_fired, ref["n_forward_passes_since_fired"])
    assert [log["threshold"] for log in logs] == ref["threshold"].tolist()
    assert [log["lr"] for log in logs] == ref["lr"].tolist()
    assert max(log["dead"] for log in logs) > 0  # the aux loss ran on latents the short window calls dead


def test_workbench_train_fine_tunes_a_published_folder_from_its_weights_and_threshold(trained, cache, tmp_path):
    """train.init_from a published folder with the saelens algorithm: the first step already reconstructs as the
    source does and its threshold is the source's (in the training's scaled units), where a fresh SAE starts
    at 0; after a few steps at a small lr the SAE is still the source, in raw units."""
    folder = published(trained, tmp_path)
    settings = {"lr": 1e-5, "normalize_activations": "expected_average_only_in", "n_batches_for_norm_estimate": 20}
    steps = 20
    recipe = write_recipe(tmp_path / "ft.yaml", cache, tmp_path / "ft", saes=[SAES[1]], init_from=str(folder),
                          saelens=settings, num_tokens=256 * steps)
    train(load_recipe(recipe))
    fresh = write_recipe(tmp_path / "fresh.yaml", cache, tmp_path / "fresh", saes=[SAES[1]], saelens=settings,
                         num_tokens=256 * steps)
    train(load_recipe(fresh))
    out = tmp_path / "ft" / f"resid_post_layer_{LAYER}" / "mat"
    section = json.loads((out / "config.json").read_text())["workbench"]
    source, tuned = load_trainable(folder), load_trainable(out)
    first = read_metrics(out / "metrics.jsonl")[0]
    first_fresh = read_metrics(tmp_path / "fresh" / f"resid_post_layer_{LAYER}" / "mat" / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["frac_variance_explained"] > 0.8 > first_fresh["frac_variance_explained"]
    assert first["threshold"] * section["norm_factor"] == pytest.approx(float(source.threshold), rel=0.02)
    assert first_fresh["threshold"] * section["norm_factor"] < 0.05 * float(source.threshold)
    assert section["init_from"] == str(folder) and section["algorithm"] == "saelens"
    assert float(tuned.threshold) == pytest.approx(float(source.threshold), rel=0.02)
    for name, value in source.state_dict().items():
        if value.is_floating_point() and value.numel() > 1:
            assert_close_to_scale(tuned.state_dict()[name], value, tol=1e-2, what=name)
