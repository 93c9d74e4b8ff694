"""The shipped recipes load, compose from the shared base, and state the published series' numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.config import SAELensTrainConfig, load_recipe
from workbench.model import resolve_layers
from workbench.sae import matryoshka_group_sizes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))

# the published Qwen3 series (model cards, huggingface.co/adamkarvonen/qwen3-*-saes; Qwen/Qwen3-* config.json): model -> (layers, hidden, 25/50/75% layers)
QWEN3 = {
    "1.7b": ("Qwen/Qwen3-1.7B", 28, 2048, [7, 14, 21]),
    "8b": ("Qwen/Qwen3-8B", 36, 4096, [9, 18, 27]),
    "14b": ("Qwen/Qwen3-14B", 40, 5120, [10, 20, 30]),
    "32b": ("Qwen/Qwen3-32B", 64, 5120, [16, 32, 48]),
}
TRAINERS = [("trainer_0", 80, 16384), ("trainer_1", 160, 16384), ("trainer_2", 80, 65536), ("trainer_3", 160, 65536)]


def test_every_shipped_recipe_and_base_loads():
    paths = [*SHIPPED, *sorted((RECIPES / "base").glob("*.yaml"))]
    names = {p.name for p in paths}
    assert {"demo.yaml", "gemma-3-1b-matryoshka.yaml", "qwen3-batchtopk.yaml",
            *(f"qwen3-{size}-batchtopk.yaml" for size in QWEN3)} <= names
    for path in paths:
        load_recipe(path)


@pytest.mark.parametrize("size", list(QWEN3))
def test_qwen3_recipe_states_the_published_series(size):
    name, num_layers, hidden, layers = QWEN3[size]
    r = load_recipe(RECIPES / f"qwen3-{size}-batchtopk.yaml")
    assert (r.model.name, r.model.num_layers, r.model.d_model, r.model.dtype) == (name, num_layers, hidden, "bfloat16")
    assert resolve_layers(list(r.collect.layers), num_layers) == layers
    assert [(s.name, s.k, s.width, s.arch) for s in r.train.saes] == [(*t, "batchtopk") for t in TRAINERS]
    assert r.data.context_length == 2048 and r.data.packing
    assert (r.train.num_tokens, r.train.batch_size) == (500_000_000, 2048)
    assert (r.collect.sink_multiple, r.collect.drop_first_token) == (10, True)
    assert (r.train.k_anneal_steps, r.train.decay_start, r.train.normalize_activations) == (0.01, 0.8, True)
    assert r.export.formats == ["dictionary_learning"]
    assert r.export.series_name == f"saes_{name.replace('/', '_')}_batch_top_k"
    assert r.collect.out == f"checkpoints/qwen3-{size}/cache"


@pytest.mark.parametrize("size", list(QWEN3))
def test_qwen3_recipes_compose_from_one_base(size):
    raw = yaml.safe_load((RECIPES / f"qwen3-{size}-batchtopk.yaml").read_text())
    assert raw["base"] == "base/qwen3-batchtopk.yaml"
    # The shared settings live only in the base: a model file states the model, its paths and its series.
    assert "saes" not in raw.get("train", {}) and "data" not in raw
    assert set(raw) == {"base", "model", "collect", "train", "export"}


def test_gemma_recipe_states_the_published_series():
    r = load_recipe(RECIPES / "gemma-3-1b-matryoshka.yaml")
    assert (r.model.name, r.model.num_layers, r.model.d_model) == ("google/gemma-3-1b-pt", 26, 1152)
    assert r.collect.layers == list(range(25)) and all(type(layer) is int for layer in r.collect.layers)
    (sae,) = r.train.saes
    assert (sae.arch, sae.width, sae.k) == ("matryoshka", 32768, 40)
    assert (r.data.path, r.data.text_key, r.train.num_tokens) == ("monology/pile-uncopyrighted", "text", 750_000_000)
    assert r.export.formats == ["saelens"]


def test_gemma_recipe_trains_with_saelens_algorithm_at_its_defaults():
    """[card] "trained ... using SAELens", and it states none of SAELens' training settings: every one is
    SAELens 6.54.12's default; the Qwen3 recipes stay on dictionary_learning's algorithm (their cards' own)."""
    r = load_recipe(RECIPES / "gemma-3-1b-matryoshka.yaml")
    assert r.train.algorithm == "saelens" and [sae.algorithm for sae in r.train.saes] == [None]
    assert r.train.saelens == SAELensTrainConfig()
    assert (r.train.batch_size, r.threshold.method) == (4096, "ema")
    for name in ("qwen3-1.7b", "qwen3-8b", "qwen3-14b", "qwen3-32b"):
        assert load_recipe(RECIPES / f"{name}-batchtopk.yaml").train.algorithm == "dictionary_learning"


def test_gemma_group_fractions_give_the_published_prefix_widths_under_dictionary_learnings_rule():
    (sae,) = load_recipe(RECIPES / "gemma-3-1b-matryoshka.yaml").train.saes
    # dictionary_learning: int(f * F) for every fraction but the last, which takes the remainder.
    by_rule = [int(f * sae.width) for f in sae.group_fractions[:-1]]
    sizes = matryoshka_group_sizes(sae.width, list(sae.group_fractions))
    assert sizes == [*by_rule, sae.width - sum(by_rule)] == [128, 384, 1536, 6144, 24576]
    assert [sum(sizes[: i + 1]) for i in range(len(sizes))] == [128, 512, 2048, 8192, 32768]
    # Exact binary fractions: the last one is exactly its share too, and they sum to 1 without rounding.
    assert [f * 32768 for f in sae.group_fractions] == [128, 384, 1536, 6144, 24576]
    assert sum(sae.group_fractions) == 1.0


def test_gemma_recipe_carries_the_published_explained_variance_table():
    targets = load_recipe(RECIPES / "gemma-3-1b-matryoshka.yaml").eval.target_explained_variance
    assert sorted(targets) == list(range(25))
    published = {0: 0.991, 6: 0.982, 12: 0.978, 18: 0.904, 24: 0.745}  # the Gemma-3-1b series model card (huggingface.co/chanind/gemma-3-1b-batch-topk-matryoshka-saes-w-32k-l0-40)
    assert {layer: round(targets[layer], 3) for layer in published} == published
    # "falling with depth": the last layer is the lowest, the first the highest
    assert min(targets, key=targets.get) == 24 and max(targets, key=targets.get) == 0
