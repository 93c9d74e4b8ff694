"""train.saes[i].algorithm: one recipe trains SAEs with either algorithm. Each SAE of a mixed layer ends
bit-equal to the same SAE trained in a recipe of its own algorithm (the batches, the seeds and the layer's
normalisation are shared); each algorithm's keys apply to its SAEs only; existing fingerprints do not move."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from workbench.collect import collect
from workbench.config import fingerprint, load_recipe, train_identity
from workbench.errors import WorkbenchError
from workbench.training import train

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
DL_SAE = {"name": "dl", "arch": "batchtopk", "width": 128, "k": 8}
SL_SAE = {"name": "sl", "arch": "matryoshka", "width": 128, "k": 8, "group_fractions": [0.25, 0.75]}
# Both algorithms on raw activations (the layer's normalisation is train.algorithm's), so that the mixed layer
# can be compared with a recipe of each algorithm alone.
COMMON = {"layers": [LAYER], "batch_size": 256, "num_tokens": 256 * 120, "eval_tokens": 2048, "checkpoint_every": 1000,
          "normalize_activations": False}
DL_KEYS = {"warmup_steps": 10, "threshold_start_step": 20}
SAELENS = {"dead_feature_window": 30, "lr": 1e-3}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed_cache") / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={out}", "data.num_tokens=16384",
                                                          "data.context_length=64", "collect.layers=[2]"]))
    return out


def write_recipe(path: Path, cache: Path, out: Path, **train_keys) -> Path:
    section = {"cache": str(cache), "out": str(out), **COMMON, **train_keys}
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": section}))
    return path


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"resid_post_layer_{LAYER}" / name / "ae.pt", weights_only=True)


def test_each_sae_of_a_mixed_layer_equals_its_algorithm_alone(cache, tmp_path):
    mixed = tmp_path / "mixed"
    train(load_recipe(write_recipe(tmp_path / "mixed.yaml", cache, mixed, saes=[DL_SAE, {**SL_SAE, "algorithm": "saelens"}],
                                   saelens=SAELENS, **DL_KEYS)))
    train(load_recipe(write_recipe(tmp_path / "dl.yaml", cache, tmp_path / "dl", saes=[DL_SAE], **DL_KEYS)))
    # the defaults of the DL keys the demo sets: the saelens algorithm refuses them set
    alone = {"algorithm": "saelens", "saelens": SAELENS, "normalize_activations": True, "warmup_steps": 1000,
             "threshold_start_step": 1000}
    train(load_recipe(write_recipe(tmp_path / "sl.yaml", cache, tmp_path / "sl", saes=[SL_SAE], **alone)))
    for name, reference in (("dl", tmp_path / "dl"), ("sl", tmp_path / "sl")):
        a, b = weights(mixed, name), weights(reference, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    sections = {name: json.loads((mixed / f"resid_post_layer_{LAYER}" / name / "config.json").read_text())
                for name in ("dl", "sl")}
    assert sections["dl"]["workbench"]["algorithm"] == "dictionary_learning"
    assert sections["dl"]["workbench"]["saelens"] is None and sections["dl"]["trainer"]["warmup_steps"] == 10
    assert sections["sl"]["workbench"]["algorithm"] == "saelens"
    assert sections["sl"]["workbench"]["saelens"]["dead_feature_window"] == 30
    assert sections["sl"]["trainer"]["warmup_steps"] == 0 and sections["sl"]["trainer"]["decay_start"] is None


def test_the_fingerprint_of_a_recipe_without_per_sae_algorithms_does_not_move():
    """An SAE whose algorithm is the recipe's, named or null, leaves the fingerprint as before the key existed."""
    two = "train.saes=[{name: trainer_0, arch: batchtopk, width: 512, k: 16}, {name: trainer_1, arch: batchtopk, width: 256, k: 8}]"
    plain = load_recipe(REPO / "recipes" / "demo.yaml", [two])
    named = load_recipe(REPO / "recipes" / "demo.yaml", [two, "train.saes[0].algorithm=dictionary_learning"])
    identity = train_identity(plain.train)
    assert "algorithm" not in identity and "saelens" not in identity
    assert all("algorithm" not in sae for sae in identity["saes"])
    assert fingerprint(train_identity(named.train)) == fingerprint(identity)
    mixed = load_recipe(REPO / "recipes" / "demo.yaml", [two, "train.saes[1].algorithm=saelens"])
    assert fingerprint(train_identity(mixed.train)) != fingerprint(identity)
    # the demo's own trainer_2 (algorithm saelens) is recorded with the saelens settings
    demo = train_identity(load_recipe(REPO / "recipes" / "demo.yaml").train)
    assert [sae.get("algorithm") for sae in demo["saes"]] == [None, None, "saelens"] and "saelens" in demo


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.saes[0].algorithm=sparsify"], "train.saes[0] (trainer_0).algorithm must be one of dictionary_learning, saelens"),
    (["train.saes[2].algorithm=dictionary_learning", "train.saelens.lr=1e-3"], "train.saelens.lr is set but no SAE trains with SAELens' algorithm"),
    (["train.saes[0].algorithm=saelens", "train.saelens.normalize_activations=expected_average_only_in"],
     "train.saelens.normalize_activations is unused with train.algorithm dictionary_learning"),
    (["train.saes[0].algorithm=saelens", "train.saes[1].algorithm=saelens"],
     "train.warmup_steps is dictionary_learning's setting, unused when every SAE trains with SAELens' algorithm"),
    (["train.saes[1].algorithm=saelens", "train.saes[1].group_weights=[0.2,0.3,0.5]"],
     "train.saes[1] (trainer_1).group_weights: SAELens adds its Matryoshka levels' losses unweighted"),
])
def test_keys_an_sae_of_the_recipe_would_not_use_are_refused(overrides, message):
    with pytest.raises(WorkbenchError, match=re.escape(message)):
        load_recipe(REPO / "recipes" / "demo.yaml", overrides)


def test_a_mixed_recipe_keeps_each_algorithms_keys():
    """The dictionary_learning keys (warmup) stay for its SAEs beside a saelens SAE, and train.saelens for that one."""
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", ["train.saes[1].algorithm=saelens", "train.saelens.lr=1e-3"])
    assert recipe.train.warmup_steps == 100 and recipe.train.saelens.lr == 1e-3
    saelens_recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        "train.algorithm=saelens", "train.saes[0].algorithm=dictionary_learning"])
    assert saelens_recipe.train.warmup_steps == 100
