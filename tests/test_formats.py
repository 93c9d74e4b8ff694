"""The two folder formats and exact conversion between them, in process (no reference library needed).

The same conversions against the real libraries are in test_convert_reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale, assert_codes_close, cut_of
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import convert, detect_format, load_sae, read_weights
from workbench.formats.weights import InferenceSAE
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE

D, F, K = 16, 64, 4


def make_sae(folder: Path, arch: str = "batchtopk", threshold: float = 0.3, seed: int = 0, layer: int = 2) -> Path:
    """A workbench SAE with random weights, saved as the trainer saves it."""
    torch.manual_seed(seed)
    sae = BatchTopKSAE(D, F, K) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(D, F, K, [8, 24, 32])
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sae.threshold.fill_(threshold)
    trainer = dl.trainer_section(sae, lr=1e-3, steps=100, auxk_alpha=1 / 32, warmup_steps=10, decay_start=80,
                                 threshold_beta=0.999, threshold_start_step=10, seed=seed, device="cpu", layer=layer,
                                 lm_name="Qwen/Qwen3-8B", group_fractions=[0.125, 0.375, 0.5] if arch != "batchtopk" else None,
                                 group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(D, 2048, 8, 4, 2048, "cpu"),
              "workbench": {"sink_multiple": 10.0, "drop_first_token": True, "norm_factor": 3.5}}
    dl.save_folder(sae, folder, config, {"l0": 4.1, "frac_variance_explained": 0.8})
    return folder


def x_random(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


def state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / dl.AE_FILE, weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit: for tensors a conversion copies (round trips, streamed files), never for computed ones."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_dictionary_learning_to_saelens_and_back_gives_the_same_tensors_and_config(tmp_path, arch):
    src = make_sae(tmp_path / "a", arch)
    assert convert(src, "saelens", tmp_path / "b") == "jumprelu"
    assert convert(tmp_path / "b", "dictionary_learning", tmp_path / "c") == type(load_sae(src)).__name__
    assert_same_tensors(state(src), state(tmp_path / "c"))
    assert (src / dl.CONFIG_FILE).read_text() == (tmp_path / "c" / dl.CONFIG_FILE).read_text()
    assert (src / dl.EVAL_FILE).read_text() == (tmp_path / "c" / dl.EVAL_FILE).read_text()


def test_saelens_folder_has_the_6x_cfg_and_a_threshold_vector(tmp_path):
    src = make_sae(tmp_path / "a", "matryoshka", threshold=0.25)
    convert(src, "saelens", tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / saelens.CFG_FILE).read_text())
    meta = cfg["metadata"]
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == D and cfg["d_sae"] == F and cfg["dtype"] == "float32"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert meta["sae_lens_version"] == "6.54.12"
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["model_name"] == "Qwen/Qwen3-8B"
    assert meta["context_size"] == 2048 and "prepend_bos" in meta and "dataset_path" in meta
    assert meta["training_architecture"] == "matryoshka_batchtopk"
    assert meta["training_architecture_details"] == {"k": K, "matryoshka_widths": [8, 32, 64]}
    assert meta["workbench"]["sink_multiple"] == 10.0
    weights = load_file(str(tmp_path / "b" / saelens.WEIGHTS_FILE))
    assert set(weights) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert weights["threshold"].shape == (F,) and bool((weights["threshold"] == 0.25).all())
    s = state(src)
    assert torch.equal(weights["W_enc"], s["W_enc"]) and torch.equal(weights["W_dec"], s["W_dec"])


def test_streamed_safetensors_file_equals_the_library_writer(tmp_path):
    W = torch.randn(300, 70)
    tensors = {"W_T": W.T, "b": torch.randn(70), "h": torch.randn(5, 3).to(torch.bfloat16)}
    saelens.write_safetensors(tmp_path / "ours.safetensors", tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"))
    ours, lib = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "lib.safetensors"))
    assert_same_tensors(dict(sorted(ours.items())), dict(sorted(lib.items())))


def test_batchtopk_encode_equals_the_converted_jumprelu(tmp_path):
    """The same latents fire with the same values. BatchTopKSAE computes nn.Linear (one fused addmm on the
    [F, D] weight), InferenceSAE a matmul on the [D, F] copy plus b_enc: equal only to fp32 rounding
    (conftest.FP32_TOL), and a latent whose pre-activation sits on the threshold 0.3 may fire in one only."""
    src = make_sae(tmp_path / "a")
    convert(src, "saelens", tmp_path / "b")
    x = x_random(256)
    ours, jump = load_sae(src), load_sae(tmp_path / "b")
    assert isinstance(ours, BatchTopKSAE) and isinstance(jump, InferenceSAE)
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).any() and (f == 0).any()
        assert_codes_close(jump.encode(x), f, cut_of(ours, f))
        assert_close_to_scale(jump.decode(f), ours.decode(f))


def saelens_folder(folder: Path, arch: str = "jumprelu", apply_b_dec: bool = True, threshold: torch.Tensor | None = None,
                   extra_cfg: dict | None = None, details: dict | None = None, unit_decoder: bool = False) -> Path:
    """A SAELens 6.x folder written by hand (as SAELens writes it)."""
    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(F, D, generator=g) * 0.5
    if unit_decoder:
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    tensors = {"W_enc": torch.randn(D, F, generator=g) * 0.5, "W_dec": W_dec, "b_enc": torch.randn(F, generator=g) * 0.1,
               "b_dec": torch.randn(D, generator=g)}
    if arch == "jumprelu":
        tensors["threshold"] = threshold if threshold is not None else torch.rand(F, generator=g) * 0.5
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "gemma",
                        "hook_name": "blocks.6.hook_resid_post", "hook_head_index": None, "prepend_bos": True,
                        "context_size": 1024, "dataset_path": "pile", "model_from_pretrained_kwargs": {}},
           "architecture": arch, **(extra_cfg or {})}
    if details is not None:
        cfg["metadata"]["training_architecture_details"] = details
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / saelens.WEIGHTS_FILE))
    (folder / saelens.CFG_FILE).write_text(json.dumps(cfg))
    return folder


def outputs(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        sae = load_sae(folder)
        f = sae.encode(x)
        return f, sae.decode(f)


@pytest.mark.parametrize("case", ["constant_threshold_no_b_dec", "vector_threshold", "vector_threshold_no_b_dec",
                                  "topk_rescaled_no_b_dec", "standard_no_b_dec"])
def test_saelens_settings_dictionary_learning_lacks_are_folded_exactly(tmp_path, case):
    """apply_b_dec_to_input and rescale_acts_by_decoder_norm fold into the weights: the same outputs, and
    converting the folded SAE back and forth again gives the same tensors (B -> A -> B)."""
    kwargs = {
        "constant_threshold_no_b_dec": dict(apply_b_dec=False, threshold=torch.full((F,), 0.2), details={"k": K}),
        "vector_threshold": dict(),
        "vector_threshold_no_b_dec": dict(apply_b_dec=False),
        "topk_rescaled_no_b_dec": dict(arch="topk", apply_b_dec=False, extra_cfg={"k": K, "rescale_acts_by_decoder_norm": True}),
        "standard_no_b_dec": dict(arch="standard", apply_b_dec=False, unit_decoder=True),
    }[case]
    src = saelens_folder(tmp_path / "sl", **kwargs)
    written = convert(src, "dictionary_learning", tmp_path / "dl")
    assert written == {"constant_threshold_no_b_dec": "BatchTopKSAE", "topk_rescaled_no_b_dec": "AutoEncoderTopK",
                       "standard_no_b_dec": "AutoEncoder"}.get(case, "JumpReluAutoEncoder")
    x = x_random(256)
    f_src, x_hat_src = outputs(src, x)
    f_dl, x_hat_dl = outputs(tmp_path / "dl", x)
    assert (f_src > 0).any()
    # A fold is fp32 arithmetic on the weights (b_dec @ W_enc into b_enc, decoder norms into W_enc): the
    # outputs agree to rounding (conftest.FP32_TOL), a latent on its threshold or top-k cut aside.
    flip_rows = assert_codes_close(f_dl, f_src, cut_of(load_sae(src), f_src))
    assert_close_to_scale(x_hat_dl[~flip_rows], x_hat_src[~flip_rows])
    convert(tmp_path / "dl", "saelens", tmp_path / "sl2")
    convert(tmp_path / "sl2", "dictionary_learning", tmp_path / "dl2")
    assert_same_tensors(state(tmp_path / "dl"), state(tmp_path / "dl2"))


def test_saelens_without_folds_converts_back_to_the_same_tensors_and_cfg(tmp_path):
    src = saelens_folder(tmp_path / "sl", apply_b_dec=False)
    convert(src, "dictionary_learning", tmp_path / "dl")
    convert(tmp_path / "dl", "saelens", tmp_path / "sl2")
    before, after = load_file(str(src / saelens.WEIGHTS_FILE)), load_file(str(tmp_path / "sl2" / saelens.WEIGHTS_FILE))
    assert_same_tensors(dict(sorted(before.items())), dict(sorted(after.items())))
    assert json.loads((src / saelens.CFG_FILE).read_text()) == json.loads((tmp_path / "sl2" / saelens.CFG_FILE).read_text())


def test_constant_threshold_is_batchtopk_only_with_a_k(tmp_path):
    """Without a training k the same SAE is a JumpReluAutoEncoder (tests/test_convert_errors.py proves it
    against both libraries); with --k it is a BatchTopKSAE."""
    src = saelens_folder(tmp_path / "sl", threshold=torch.full((F,), 0.2))
    assert convert(src, "dictionary_learning", tmp_path / "jump") == "JumpReluAutoEncoder"
    assert convert(src, "dictionary_learning", tmp_path / "dl", k=K) == "BatchTopKSAE"
    assert int(state(tmp_path / "dl")["k"]) == K and float(state(tmp_path / "dl")["threshold"]) == pytest.approx(0.2)
    with pytest.raises(WorkbenchError, match="contradicts"):
        convert(tmp_path / "dl", "saelens", tmp_path / "sl2", k=K + 1)


@pytest.mark.parametrize("change, message", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "layer_norm"}, "normalises inputs at run time"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"d_sae": F + 1}, "inconsistent"),
])
def test_saelens_settings_that_cannot_be_represented_are_refused_with_the_reason(tmp_path, change, message):
    src = saelens_folder(tmp_path / "sl", extra_cfg=change)
    with pytest.raises(WorkbenchError, match=message):
        convert(src, "dictionary_learning", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_non_integer_training_k_is_refused(tmp_path):
    src = saelens_folder(tmp_path / "sl", threshold=torch.full((F,), 0.2), details={"k": 40.5})
    with pytest.raises(WorkbenchError, match="not a positive integer"):
        convert(src, "dictionary_learning", tmp_path / "dl")


def test_standard_sae_with_non_unit_decoder_is_refused(tmp_path):
    src = saelens_folder(tmp_path / "sl", arch="standard")
    with pytest.raises(WorkbenchError, match="renormalises decoder rows"):
        convert(src, "dictionary_learning", tmp_path / "dl")


def test_extra_tensor_in_saelens_weights_is_refused(tmp_path):
    src = saelens_folder(tmp_path / "sl")
    tensors = load_file(str(src / saelens.WEIGHTS_FILE)) | {"k": torch.tensor(4)}
    save_file(tensors, str(src / saelens.WEIGHTS_FILE))
    with pytest.raises(WorkbenchError, match=r"unexpected \['k'\]"):
        read_weights(src)


def test_unsupported_dictionary_learning_class_is_refused(tmp_path):
    src = make_sae(tmp_path / "a")
    config = json.loads((src / dl.CONFIG_FILE).read_text())
    config["trainer"]["dict_class"] = "GatedAutoEncoder"
    (src / dl.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(WorkbenchError, match="GatedAutoEncoder is not supported"):
        convert(src, "saelens", tmp_path / "b")


def test_state_dict_that_does_not_match_its_class_is_refused(tmp_path):
    src = make_sae(tmp_path / "a")
    torch.save(state(src) | {"extra": torch.zeros(1)}, src / dl.AE_FILE)
    with pytest.raises(WorkbenchError, match=r"unexpected \['extra'\]"):
        read_weights(src)


def test_config_k_that_contradicts_the_checkpoint_is_refused(tmp_path):
    src = make_sae(tmp_path / "a")
    config = json.loads((src / dl.CONFIG_FILE).read_text())
    config["trainer"]["k"] = K + 1
    (src / dl.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(WorkbenchError, match="inconsistent"):
        read_weights(src)


def test_format_detection(tmp_path):
    assert detect_format(make_sae(tmp_path / "a")) == "dictionary_learning"
    assert detect_format(saelens_folder(tmp_path / "b")) == "saelens"
    (tmp_path / "c").mkdir()
    with pytest.raises(WorkbenchError, match="neither"):
        detect_format(tmp_path / "c")
    with pytest.raises(WorkbenchError, match="already a saelens folder"):
        convert(tmp_path / "b", "saelens", tmp_path / "d")
    with pytest.raises(WorkbenchError, match="--to must be one of"):
        convert(tmp_path / "a", "hf", tmp_path / "d")


def test_sparsity_travels_with_the_sae_both_ways(tmp_path):
    src = make_sae(tmp_path / "a")
    sparsity = torch.log10(torch.rand(F) + 1e-10)
    save_file({"sparsity": sparsity}, str(src / dl.SPARSITY_FILE))
    convert(src, "saelens", tmp_path / "b")
    convert(tmp_path / "b", "dictionary_learning", tmp_path / "c")
    assert torch.equal(load_file(str(tmp_path / "b" / saelens.SPARSITY_FILE))["sparsity"], sparsity)
    assert torch.equal(load_file(str(tmp_path / "c" / dl.SPARSITY_FILE))["sparsity"], sparsity)


def test_existing_folder_api_still_loads_what_conversion_writes(tmp_path):
    """The trainer's entry points (load_folder / load_state_dict) read converted folders."""
    src = saelens_folder(tmp_path / "sl", threshold=torch.full((F,), 0.2), details={"k": K})
    convert(src, "dictionary_learning", tmp_path / "dl")
    sae, config = dl.load_folder(tmp_path / "dl")
    assert isinstance(sae, BatchTopKSAE) and int(sae.k) == K
    assert config["trainer"]["dict_class"] == "BatchTopKSAE" and config["buffer"]["ctx_len"] == 1024
    assert config["trainer"]["layer"] == 6 and config["trainer"]["lm_name"] == "gemma"
    assert set(dl.load_state_dict(tmp_path / "dl" / dl.AE_FILE, mmap=True)) == set(dl.CLASSES["BatchTopKSAE"].layout)


def test_pre_6_flat_saelens_config_is_read_as_saelens_reads_it(tmp_path):
    """Before 6.0, cfg.json was flat and topk was activation_fn (SAELens' handle_pre_6_0_config)."""
    src = saelens_folder(tmp_path / "sl", arch="topk")
    cfg = json.loads((src / saelens.CFG_FILE).read_text())
    flat = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "activation_fn": "topk", "activation_fn_kwargs": {"k": K}, **cfg["metadata"]}
    del flat["sae_lens_version"]
    (src / saelens.CFG_FILE).write_text(json.dumps(flat))
    assert convert(src, "dictionary_learning", tmp_path / "dl") == "AutoEncoderTopK"
    trainer = dl.read_config(tmp_path / "dl")["trainer"]
    assert (trainer["k"], trainer["layer"], trainer["lm_name"]) == (K, 6, "gemma")
    # Nothing is folded here (b_dec applied, no rescaling): both folders load as InferenceSAE with the same
    # tensors, so both outputs are the same computation and equal bit for bit.
    a, b = load_sae(src), load_sae(tmp_path / "dl")
    assert isinstance(a, InferenceSAE) and isinstance(b, InferenceSAE) and a.k == b.k == K
    settings = ("activation", "apply_b_dec_to_input", "rescale_acts_by_decoder_norm")
    assert [getattr(a, n) for n in settings] == [getattr(b, n) for n in settings] == ["topk", True, False]
    assert_same_tensors(dict(a.named_parameters()), dict(b.named_parameters()))
    x = x_random(128)
    f_src, x_hat_src = outputs(src, x)
    f_dl, x_hat_dl = outputs(tmp_path / "dl", x)
    assert torch.equal(f_src, f_dl) and torch.equal(x_hat_src, x_hat_dl)
