"""`workbench plan` (the dry run): offline, no weights, and figures that match hand computation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import torch_threads

from workbench.cli import main
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.plan import plan, render

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture
def no_model_access(monkeypatch):
    """Any attempt to read a model config or weights fails the test: the plan must come from the recipe."""
    def refuse(*args, **kwargs):
        raise AssertionError("plan tried to load a model config or weights")

    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_dry_run_of_every_shipped_recipe_works_offline(path, no_model_access, capsys):
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    p = plan(load_recipe(path))
    assert p.shape_source == "recipe"
    assert f"{p.cache_bytes:,} bytes" in out and f"{p.steps:,} steps per SAE" in out
    if path.name != "demo.yaml":  # the published recipes read enough text for their training tokens
        assert p.warnings == []


def test_qwen3_8b_figures_match_hand_computation(no_model_access):
    p = plan(load_recipe(REPO / "recipes/qwen3-8b-batchtopk.yaml"))
    assert (p.num_layers, p.d_model, p.layers, p.store_dtype) == (36, 4096, [9, 18, 27], "bfloat16")
    assert p.bytes_per_token_per_layer == 4096 * 2 == 8192
    # data.num_tokens 502,000,000 at context 2048: ceil(502e6 / 2048) = 245,118 rows (245,117 x 2048 =
    # 501,999,616 is short), packed full: 245,118 x 2048 = 502,001,664 tokens, one first token a row.
    assert (p.sequences, p.tokens, p.first_tokens) == (245_118, 502_001_664, 245_118)
    # 16 rows a forward: ceil(245,118 / 16) = 15,320 batches; 4 batches a shard: 3,830 shards.
    assert (p.forward_batches, p.shards) == (15_320, 3_830)
    # per token 20 B (int32 token_id, int64 sequence, int32 position, int32 batch); per token per layer
    # 8192 + 6 B (float32 norm, uint8 drop_reason, bool kept); per batch per layer 4 B (float32 median):
    # 502,001,664 x (20 + 3 x 8,198) + 3 x 15,320 x 4 = 502,001,664 x 24,614 + 183,840
    assert p.cache_bytes == 12_356_268_957_696 + 183_840 == 12_356_269_141_536
    assert p.cache_bytes_per_layer == 502_001_664 * 8198 + 15_320 * 4
    # int(500,000,000 / 2048) = int(244,140.625) = 244,140 steps, rounded down as dictionary_learning_demo
    # does; decay from int(0.8 x 244,140) = 195,312; k annealed over int(0.01 x 244,140) = 2,441 steps.
    assert (p.steps, p.decay_start_step, p.k_anneal_steps) == (244_140, 195_312, 2_441)
    assert len(p.saes) == 12
    by_key = {(s.layer, s.name): s for s in p.saes}
    t2 = by_key[(18, "trainer_2")]
    assert (t2.width, t2.k, t2.lr) == (65536, 80, pytest.approx(1e-4))  # 2e-4 / sqrt(65536 / 16384)
    assert by_key[(9, "trainer_0")].lr == pytest.approx(2e-4)
    assert t2.weights_bytes == 4 * (2 * 4096 * 65536 + 65536 + 4096 + 2)
    assert p.cache_dir == "checkpoints/qwen3-8b/cache"
    assert t2.train_dir == "checkpoints/qwen3-8b/saes/resid_post_layer_18/trainer_2"
    assert t2.export_dirs == {"dictionary_learning":
                              "checkpoints/qwen3-8b/export/dictionary_learning/saes_Qwen_Qwen3-8B_batch_top_k/resid_post_layer_18/trainer_2"}
    text = render(p)
    for figure in ("-> 9, 18, 27", "8,192 B activations", "244,140 steps per SAE", "12,356,269,141,536 bytes",
                   "saes_Qwen_Qwen3-8B_batch_top_k/resid_post_layer_18/trainer_2"):
        assert figure in text


def test_qwen3_32b_and_gemma_figures(no_model_access):
    p = plan(load_recipe(REPO / "recipes/qwen3-32b-batchtopk.yaml"))
    assert (p.layers, p.bytes_per_token_per_layer) == ([16, 32, 48], 5120 * 2)
    assert p.cache_bytes == 502_001_664 * (20 + 3 * (10240 + 6)) + 3 * 30_640 * 4
    g = plan(load_recipe(REPO / "recipes/gemma-3-1b-matryoshka.yaml"))
    assert g.layers == list(range(25)) and g.bytes_per_token_per_layer == 2304
    assert g.steps == 750_000_000 // 4096 == 183_105
    assert {s.layer: s.group_sizes for s in g.saes}[12] == [128, 384, 1536, 6144, 24576]
    assert g.saes[24].export_dirs == {
        "saelens": "checkpoints/gemma-3-1b/export/saelens/blocks.24.hook_resid_post"}
    text = render(g)
    assert "L0 0.991" in text and "L6 0.982" in text and "L12 0.978" in text and "L18 0.904" in text and "L24 0.745" in text


def test_plan_cache_size_matches_what_collection_writes(tmp_path):
    """The formula follows the cache layout (cache/layout.py): a real collection on the tiny model writes what it predicts."""

    from workbench.collect import collect

    # 4 shards of 2 batches x 16 rows x 128 tokens = 4096 tokens: one whole HDF5 chunk per dataset
    overrides = [f"collect.out={tmp_path / 'cache'}", "data.num_tokens=16384", "collect.shard_batches=2"]
    recipe = load_recipe(REPO / "recipes/demo.yaml", overrides)
    p = plan(recipe)
    with torch_threads(1):  # tiny tensors: threads only add hand-off cost on a busy machine
        collect(recipe)
    written = sum(f.stat().st_size for f in (tmp_path / "cache" / "shards").iterdir())
    assert p.shards == 4 and p.cache_bytes == 16384 * (20 + 2 * (64 * 4 + 6)) + 2 * 8 * 4
    # HDF5's headers and the 1024-entry batch_median chunks cost ~40 kB a shard: nothing at recipe scale
    assert p.cache_bytes <= written <= p.cache_bytes + p.shards * 64 * 1024


def test_plan_reads_the_model_config_when_the_recipe_omits_the_shape():
    p = plan(load_recipe(REPO / "recipes/demo.yaml", ["model.num_layers=null", "model.d_model=null"]))
    assert (p.num_layers, p.d_model, p.layers, p.shape_source) == (4, 64, [2, 3], "model config")


def test_plan_without_shape_offline_names_the_fix():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "workbench", "plan", "recipes/qwen3-8b-batchtopk.yaml", "model.d_model=null"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.num_layers and model.d_model" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_with_auto_dtype_offline_asks_for_the_dtype(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(WorkbenchError, match="a model.dtype other than auto"):
        plan(load_recipe(REPO / "recipes/qwen3-8b-batchtopk.yaml", ["model.dtype=auto"]))


def test_plan_with_auto_dtype_takes_the_checkpoints_dtype():
    p = plan(load_recipe(REPO / "recipes/demo.yaml", ["model.dtype=auto"]))
    assert p.store_dtype == "float32" and p.bytes_per_token_per_layer == 64 * 4
