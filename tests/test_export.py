"""`workbench export`: every SAE of a training run, in the published dictionary_learning layout or as SAELens
folders, with a model card; SAEs without a JumpReLU threshold are refused unless told otherwise. And using an
exported SAE with the attention-sink filter it was trained under (workbench.inference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale
from safetensors.torch import load_file, save_file

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.export import export_run
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import load_sae
from workbench.inference import encode_filtered, filter_settings
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE
from workbench.sink import first_token_mask, sink_filter

D, F, K = 16, 64, 4
SERIES = "saes_Qwen_Qwen3-8B_batch_top_k"


def write_sae(run: Path, layer: int, name: str, arch: str, threshold: float = 0.3, sparsity: bool = False) -> Path:
    """One SAE as the trainer writes it: <run>/resid_post_layer_<L>/<name>/{ae.pt, config.json, eval_results.json}."""
    torch.manual_seed(layer * 10 + len(name))
    sae = BatchTopKSAE(D, F, K) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(D, F, K, [16, 48])
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    trainer = dl.trainer_section(sae, lr=1e-3, steps=100, auxk_alpha=1 / 32, warmup_steps=10, decay_start=80,
                                 threshold_beta=0.999, threshold_start_step=10, seed=0, device="cpu", layer=layer,
                                 lm_name="Qwen/Qwen3-8B", group_fractions=[0.25, 0.75] if arch != "batchtopk" else None,
                                 group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(D, 2048, 8, 4, 2048, "cpu"),
              "workbench": {"sink_multiple": 10.0, "sink_median": "real", "drop_first_token": True,
                            "dataset": "HuggingFaceFW/fineweb", "threshold": {"method": "l0", "value": threshold}}}
    folder = run / f"resid_post_layer_{layer}" / name
    dl.save_folder(sae, folder, config, {"l0": 4.25 + layer, "frac_variance_explained": 0.5 + layer / 10})
    if sparsity:
        save_file({"sparsity": torch.full((F,), -2.0)}, str(folder / dl.SPARSITY_FILE))
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    for layer in (2, 3):
        write_sae(run, layer, "trainer_0", "batchtopk", sparsity=layer == 2)
        write_sae(run, layer, "trainer_1", "matryoshka")
    return run


def test_dictionary_learning_export_has_the_published_layout_and_identical_files(run, tmp_path):
    out = tmp_path / "export"
    exported = export_run(run, "dictionary_learning", out)
    assert [e.sae_id for e in exported] == [f"{SERIES}/resid_post_layer_{L}/trainer_{i}" for L in (2, 3) for i in (0, 1)]
    for e in exported:
        for name in (dl.AE_FILE, dl.CONFIG_FILE, dl.EVAL_FILE):
            assert (e.folder / name).read_bytes() == (e.source / name).read_bytes()
        assert e.folder == out / e.sae_id
    card = (out / "README.md").read_text()
    assert f"# {SERIES}" in card
    assert f"| 2 | `{SERIES}/resid_post_layer_2/trainer_0` | {F} | 6.2 | 0.700 |" in card
    assert f"| 3 | `{SERIES}/resid_post_layer_3/trainer_1` | {F} | 7.2 | 0.800 |" in card
    assert "| trainer_1 | Matryoshka BatchTopK | 64 | 4 | 16, 48 | l0 |" in card
    assert "**10 x the median token norm of its forward batch**" in card and "first token" in card
    assert "load_dictionary(" in card and "SAE.load_from_disk(" in card and "encode_filtered" in card


def test_saelens_export_writes_one_folder_per_sae_with_metadata(run, tmp_path):
    out = tmp_path / "export"
    exported = export_run(run, "saelens", out)
    assert [e.sae_id for e in exported] == [f"blocks.{L}.hook_resid_post/trainer_{i}" for L in (2, 3) for i in (0, 1)]
    for e in exported:
        cfg = json.loads((e.folder / saelens.CFG_FILE).read_text())
        meta = cfg["metadata"]
        assert cfg["architecture"] == "jumprelu" and meta["sae_lens_version"] == "6.54.12"
        assert meta["hook_name"] == f"blocks.{e.layer}.hook_resid_post" and meta["model_name"] == "Qwen/Qwen3-8B"
        assert meta["context_size"] == 2048 and meta["dataset_path"] == "HuggingFaceFW/fineweb"
        assert meta["workbench"]["sink_multiple"] == 10.0 and meta["training_architecture_details"]["k"] == K
        weights = load_file(str(e.folder / saelens.WEIGHTS_FILE))
        assert weights["threshold"].shape == (F,) and bool((weights["threshold"] == 0.3).all())
        assert (e.folder / saelens.SPARSITY_FILE).is_file() == (e.layer == 2 and e.name == "trainer_0")
        if e.name == "trainer_1":
            assert meta["training_architecture"] == "matryoshka_batchtopk"
            assert meta["training_architecture_details"]["matryoshka_widths"] == [16, 64]
    card = (out / "README.md").read_text()
    assert "| 2 | `blocks.2.hook_resid_post/trainer_0` | 64 | 6.2 | 0.700 |" in card
    assert 'SAE.load_from_disk("blocks.2.hook_resid_post/trainer_0"' in card


def test_one_sae_a_layer_uses_the_hook_name_as_its_id(tmp_path):
    run = tmp_path / "run"
    for layer in (0, 6):
        write_sae(run, layer, "trainer_0", "matryoshka")
    exported = export_run(run, "saelens", tmp_path / "export")
    assert [e.sae_id for e in exported] == ["blocks.0.hook_resid_post", "blocks.6.hook_resid_post"]
    assert (tmp_path / "export" / "blocks.6.hook_resid_post" / saelens.CFG_FILE).is_file()


def test_uncalibrated_sae_is_refused_unless_allowed(run, tmp_path, capsys):
    bad = write_sae(run, 3, "trainer_2", "batchtopk", threshold=-1.0)
    with pytest.raises(WorkbenchError, match="no JumpReLU threshold") as err:
        export_run(run, "saelens", tmp_path / "export")
    assert str(bad) in str(err.value) and "workbench threshold" in str(err.value) and "--allow-uncalibrated" in str(err.value)
    assert not (tmp_path / "export").exists()
    assert main(["export", str(run), "--to", "dictionary_learning", "--out", str(tmp_path / "export")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "export"), "--allow-uncalibrated"]) == 0
    assert "exported 5 SAEs" in capsys.readouterr().out
    assert "not set (-1)" in (tmp_path / "export" / "README.md").read_text()


def test_export_into_the_run_is_refused(run):
    with pytest.raises(WorkbenchError, match="inside the run"):
        export_run(run, "saelens", run / "export")


def test_series_name_can_be_chosen(run, tmp_path):
    exported = export_run(run, "dictionary_learning", tmp_path / "export", series_name="my_series")
    assert exported[0].folder == tmp_path / "export" / "my_series" / "resid_post_layer_2" / "trainer_0"

def resid_with_a_sink() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    resid_BLD = torch.randn(2, 6, D, generator=g)
    resid_BLD[0, 3] *= 200  # an attention sink: far above 10x the median norm
    valid_BL = torch.ones(2, 6, dtype=torch.bool)
    valid_BL[1, 4:] = False  # padding
    return resid_BLD, valid_BL


def test_sink_tokens_padding_and_first_tokens_encode_to_zero(tmp_path):
    folder = write_sae(tmp_path / "run", 2, "trainer_0", "batchtopk", threshold=0.0)
    sae = load_sae(folder)
    resid_BLD, valid_BL = resid_with_a_sink()
    first_BL = first_token_mask(torch.ones(2, 6, dtype=torch.long), valid_BL.long(), bos_token_id=None)
    with torch.no_grad():
        f_BLF, keep_BL = encode_filtered(sae, resid_BLD, multiple=10.0, valid_BL=valid_BL, first_token_BL=first_BL)
        expected_BLF = sae.encode(resid_BLD.reshape(-1, D)).reshape(2, 6, -1)
    assert torch.equal(keep_BL, sink_filter(resid_BLD, 10.0, valid_BL).keep_BL & ~first_BL)
    assert not keep_BL[0, 3] and not keep_BL[1, 4:].any() and not keep_BL[:, 0].any()
    assert (f_BLF[~keep_BL] == 0).all()  # exact: never encoded, written as zeros
    # The kept rows were encoded as a batch of 7, the expectation as a batch of all 12: another GEMM shape,
    # which may round differently (conftest.FP32_TOL). The threshold is 0, where JumpReLU is a relu: no jump,
    # so a latent that rounds to the other side of 0 differs by its own tiny value only.
    assert_close_to_scale(f_BLF[keep_BL], expected_BLF[keep_BL]) and (f_BLF[keep_BL] > 0).any()


def test_exported_saelens_folder_gives_the_same_filtered_latents(tmp_path):
    write_sae(tmp_path / "run", 2, "trainer_0", "matryoshka", threshold=0.0)
    exported = export_run(tmp_path / "run", "saelens", tmp_path / "export")
    resid_BLD, valid_BL = resid_with_a_sink()
    settings = filter_settings(exported[0].folder)
    assert settings == {"multiple": 10.0, "median_over": "real"} == filter_settings(exported[0].source)
    with torch.no_grad():
        ours = encode_filtered(load_sae(exported[0].source), resid_BLD, valid_BL=valid_BL, **settings)
        theirs = encode_filtered(load_sae(exported[0].folder), resid_BLD, valid_BL=valid_BL, **settings)
    assert torch.equal(ours[1], theirs[1])  # the sink filter: one function on the same activations
    assert not ours[1].all() and (ours[0][~ours[1]] == 0).all() and (theirs[0][~theirs[1]] == 0).all()
    # MatryoshkaBatchTopKSAE and SAELens' order of operations in InferenceSAE are different code for the same
    # math: equal to fp32 rounding (conftest.FP32_TOL); threshold 0, so no latent can flip (see above).
    assert_close_to_scale(theirs[0], ours[0]) and (ours[0] > 0).any()
