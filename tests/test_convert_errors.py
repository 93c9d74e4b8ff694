"""`workbench convert` and `workbench export` on inputs a user can get wrong, and into folders they can get
wrong: every refusal is one line (exit status 2, no traceback) that names the thing, nothing is created
for a refused input, an existing output is never mixed with another SAE or run, and a write that fails
(a parent that is a file, a full disk, a read-only filesystem) leaves no partial file and loses nothing.

Also the proof that an exact conversion is never refused: a SAELens jumprelu SAE whose threshold is one
constant and which records no k, written by SAELens itself, converts to dictionary_learning's
JumpReluAutoEncoder, loads with its `load_dictionary`, gives the same outputs and converts back. The
reference libraries run only in subprocesses (dictionary_learning imports nnsight, which patches torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.export import export_run
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import convert, load_sae
from workbench.formats.output import MARKER
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE
from workbench.verify import run_reference

REPO = Path(__file__).resolve().parents[1]
D, F, K = 16, 64, 4

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- builders and checks ----

def dl_sae(folder: Path, arch: str = "batchtopk", seed: int = 0, layer: int = 2, sparsity: bool = False) -> Path:
    """A BatchTopK / Matryoshka SAE folder with random weights, written as the trainer writes it."""
    torch.manual_seed(seed)
    sae = BatchTopKSAE(D, F, K) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(D, F, K, [16, 48])
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sae.threshold.fill_(0.3)
    trainer = dl.trainer_section(sae, lr=1e-3, steps=100, auxk_alpha=1 / 32, warmup_steps=10, decay_start=80,
                                 threshold_beta=0.999, threshold_start_step=10, seed=seed, device="cpu", layer=layer,
                                 lm_name="Qwen/Qwen3-8B", group_fractions=None if arch == "batchtopk" else [0.25, 0.75],
                                 group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(D, 2048, 8, 4, 2048, "cpu"),
              "workbench": {"sink_multiple": 10.0, "drop_first_token": True}}
    dl.save_folder(sae, folder, config, {"l0": 4.0, "frac_variance_explained": 0.8})
    if sparsity:
        save_file({"sparsity": torch.full((F,), -2.0)}, str(folder / dl.SPARSITY_FILE))
    return folder


def sl_sae(folder: Path, arch: str = "jumprelu", threshold: torch.Tensor | None = None, k: int | None = None) -> Path:
    """A SAELens 6.x folder written by hand, as SAELens writes it (k: for topk)."""
    g = torch.Generator().manual_seed(3)
    tensors = {"W_enc": torch.randn(D, F, generator=g) * 0.5, "W_dec": torch.randn(F, D, generator=g) * 0.5,
               "b_enc": torch.randn(F, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g)}
    if arch == "jumprelu":
        tensors["threshold"] = threshold if threshold is not None else torch.rand(F, generator=g) * 0.5
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "gemma", "hook_name": "blocks.6.hook_resid_post",
                        "context_size": 1024, "prepend_bos": True, "dataset_path": "pile"},
           "architecture": arch}
    if k is not None:
        cfg["k"] = k
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / saelens.WEIGHTS_FILE))
    (folder / saelens.CFG_FILE).write_text(json.dumps(cfg))
    return folder


def uniform_sl(folder: Path) -> Path:
    """A jumprelu SAE whose threshold is one constant, with no training k recorded."""
    return sl_sae(folder, threshold=torch.full((F,), 0.2))


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_ae(folder: Path, change: Callable[[dict], object]) -> None:
    state = torch.load(folder / dl.AE_FILE, weights_only=True)
    change(state)
    torch.save(state, folder / dl.AE_FILE)


def edit_safetensors(path: Path, change: Callable[[dict], object]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path (what "intact" and "identical" compare)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(stderr: str, command: str) -> str:
    """The single error line of a refused command (no traceback, nothing else on stderr)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"workbench {command}: error: "), lines[0]
    return lines[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """workbench.cli.main in process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def refused(capsys, fragment: str, *args: str) -> str:
    rc, out, err = cli(capsys, *args)
    line = one_line(err, args[0])
    assert rc == 2 and fragment in line, line
    return line


# ---- 1. an exact conversion is never refused: a constant threshold without k ----

MAKE_UNIFORM = r"""
import sys, torch
from pathlib import Path
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

out, D, F = Path(sys.argv[1]), 32, 128
torch.manual_seed(0)
for name, apply_b_dec in (("uniform", True), ("uniform_no_b_dec", False)):
    meta = SAEMetadata(model_name="google/gemma-3-1b-pt", hook_name="blocks.6.hook_resid_post", context_size=1024,
                       prepend_bos=True, dataset_path="monology/pile-uncopyrighted")
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=apply_b_dec, metadata=meta))
    with torch.no_grad():
        for p_name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p_name.startswith("b_") else D ** -0.5))
        sae.threshold.fill_(0.25)
    sae.save_model(out / name)
"""
UNIFORM = ("uniform", "uniform_no_b_dec")
REF_D, REF_F = 32, 128


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max abs difference over encode / decode / forward, relative to max(1, |reference|) (verify's measure)."""
    return max(float((a[k] - b[k]).abs().max()) / max(1.0, float(b[k].abs().max())) for k in ("encode", "decode", "forward"))


def sl_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(sorted(load_file(str(folder / saelens.WEIGHTS_FILE)).items()))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def uniform(tmp_path_factory, one_thread):
    """SAELens-written uniform-threshold SAEs, converted to dictionary_learning by the CLI and back, and
    every folder's outputs as its own library computes them (one process per library)."""
    root = tmp_path_factory.mktemp("uniform")
    subprocess.run([sys.executable, "-c", MAKE_UNIFORM, str(root / "sl")], check=True, capture_output=True, cwd=root)
    lines = {}
    for name in UNIFORM:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert main(["convert", str(root / "sl" / name), "--to", "dictionary_learning", "--out", str(root / "dl" / name)]) == 0
        lines[name] = stdout.getvalue()
        convert(root / "dl" / name, "saelens", root / "sl_rt" / name)
        convert(root / "sl_rt" / name, "dictionary_learning", root / "dl_rt" / name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, REF_D, generator=g)
    f = torch.relu(torch.randn(512, REF_F, generator=g)) * (torch.rand(512, REF_F, generator=g) < 0.1)
    dl_folders = [root / group / n for group in ("dl", "dl_rt") for n in UNIFORM]
    sl_folders = [root / group / n for group in ("sl", "sl_rt") for n in UNIFORM]
    outputs = dict(zip(dl_folders, run_reference("dictionary_learning", dl_folders, [{"x": x, "f": f}] * 4), strict=True))
    outputs |= dict(zip(sl_folders, run_reference("saelens", sl_folders, [{"x": x, "f": f}] * 4), strict=True))
    return {"root": root, "lines": lines, "outputs": outputs, "x": x}


def test_uniform_threshold_without_k_converts_to_a_jumprelu_autoencoder_and_says_why(uniform):
    root = uniform["root"]
    for name in UNIFORM:
        assert uniform["lines"][name] == (f"{root / 'sl' / name} -> {root / 'dl' / name}: wrote dictionary_learning "
                                          "JumpReluAutoEncoder: no training k recorded (pass --k K for BatchTopKSAE)\n")
        assert dl.read_config(root / "dl" / name)["trainer"]["dict_class"] == "JumpReluAutoEncoder"
        threshold = torch.load(root / "dl" / name / dl.AE_FILE, weights_only=True)["threshold"]
        assert threshold.shape == (REF_F,) and bool((threshold == 0.25).all())


def test_dictionary_learning_loads_the_converted_sae_and_gives_the_same_outputs_as_saelens(uniform):
    """load_dictionary (in its own process) against SAE.load_from_disk on the original: within 1e-5 of the
    output scale, the fp32 rounding of folding b_dec into b_enc (JumpReluAutoEncoder never subtracts
    b_dec from its input) and of two libraries' matmuls; 1e-5 is `workbench verify`'s tolerance."""
    root, out = uniform["root"], uniform["outputs"]
    for name in UNIFORM:
        source, converted = out[root / "sl" / name], out[root / "dl" / name]
        assert not isinstance(converted, str), converted
        fired = source["encode"] > 0
        assert fired.any() and (~fired).any()
        assert max_rel_diff(converted, source) <= 1e-5, name
        # the threshold matters: latents with 0 < pre <= 0.25 exist on these inputs and are zero in both
        with torch.no_grad():
            relu = load_sae(root / "sl" / name)
            relu.activation = "relu"
            assert bool(((relu.encode(uniform["x"]) > 0) & ~fired).any())
        assert bool(((converted["encode"] > 0) == fired).all())


def test_the_converted_sae_converts_back_to_the_same_tensors(uniform):
    """Without a fold (apply_b_dec_to_input false) SAELens -> dictionary_learning -> SAELens gives back the
    same tensors and cfg bit for bit. With the fold, dictionary_learning -> SAELens -> dictionary_learning
    does, the round-tripped SAELens folder keeps W_enc, W_dec, b_dec and the threshold bit for bit, and
    SAELens gives it the same outputs (1e-5, as above)."""
    root, out = uniform["root"], uniform["outputs"]
    assert same(sl_tensors(root / "sl" / "uniform_no_b_dec"), sl_tensors(root / "sl_rt" / "uniform_no_b_dec"))
    assert (json.loads((root / "sl" / "uniform_no_b_dec" / saelens.CFG_FILE).read_text())
            == json.loads((root / "sl_rt" / "uniform_no_b_dec" / saelens.CFG_FILE).read_text()))
    for name in UNIFORM:
        assert same(torch.load(root / "dl" / name / dl.AE_FILE, weights_only=True),
                    torch.load(root / "dl_rt" / name / dl.AE_FILE, weights_only=True))
        original, back = sl_tensors(root / "sl" / name), sl_tensors(root / "sl_rt" / name)
        assert all(torch.equal(original[n], back[n]) for n in ("W_enc", "W_dec", "b_dec", "threshold"))
        assert max_rel_diff(out[root / "sl_rt" / name], out[root / "sl" / name]) <= 1e-5


def test_k_turns_a_uniform_threshold_into_batchtopk_and_says_so(tmp_path, capsys):
    src = uniform_sl(tmp_path / "sl")
    rc, out, err = cli(capsys, "convert", src, "--to", "dictionary_learning", "--out", tmp_path / "dl", "--k", K)
    assert rc == 0, err
    assert out == (f"{src} -> {tmp_path / 'dl'}: wrote dictionary_learning BatchTopKSAE: one JumpReLU threshold (0.2) "
                   f"and training k={K}\n")
    assert int(torch.load(tmp_path / "dl" / dl.AE_FILE, weights_only=True)["k"]) == K


# ---- 2. --k range ----

@pytest.mark.parametrize("k", [-5, 0, 100000])
def test_k_out_of_range_is_one_line(tmp_path, capsys, k):
    """The CLI's argument parser refuses k < 1 itself; the conversion refuses k > d_sae, and any k out of
    range when called from Python."""
    src = uniform_sl(tmp_path / "sl")
    line = refused(capsys, "positive integer", "convert", src, "--to", "dictionary_learning", "--out", tmp_path / "dl",
                   "--k", str(k))
    assert "--k" in line and str(k) in line
    if k > 0:
        assert f"--k {k} is not a positive integer up to d_sae={F}" in line
    with pytest.raises(WorkbenchError, match=f"--k {k} is not a positive integer up to d_sae={F}"):
        convert(src, "dictionary_learning", tmp_path / "dl", k=k)
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("arch", ["jumprelu", "standard"])
def test_k_for_an_sae_without_one_constant_threshold_is_refused(tmp_path, capsys, arch):
    src = sl_sae(tmp_path / "sl", arch=arch)
    refused(capsys, "drop --k", "convert", src, "--to", "dictionary_learning", "--out", tmp_path / "dl", "--k", K)
    assert not (tmp_path / "dl").exists()


# ---- 3. consistency of a dictionary_learning folder ----

def _config(folder: Path, change: Callable[[dict], object]) -> None:
    edit_json(folder / dl.CONFIG_FILE, change)


DL_DAMAGE = {
    "decoder_width": (lambda f: edit_ae(f, lambda s: s.update({"decoder.weight": torch.zeros(D, F + 1)})),
                      f"the tensor shapes disagree (b_dec [{D}], k [], threshold [], decoder.weight [{D}, {F + 1}], "
                      f"encoder.weight [{F}, {D}], encoder.bias [{F}]"),
    "b_dec_length": (lambda f: edit_ae(f, lambda s: s.update({"b_dec": torch.zeros(D + 1)})), f"b_dec [{D + 1}]"),
    "k_vector": (lambda f: edit_ae(f, lambda s: s.update({"k": torch.tensor([K, K])})), "k [2]"),
    "threshold_vector": (lambda f: edit_ae(f, lambda s: s.update({"threshold": torch.zeros(F)})), f"threshold [{F}]"),
    "dict_size": (lambda f: _config(f, lambda c: c["trainer"].update(dict_size=F + 1)),
                  f"says trainer.dict_size={F + 1} but the weights say {F}"),
    "activation_dim": (lambda f: _config(f, lambda c: c["trainer"].update(activation_dim=D * 2)),
                       f"says trainer.activation_dim={D * 2} but the weights say {D}"),
    "d_submodule": (lambda f: _config(f, lambda c: c["buffer"].update(d_submodule=D + 1)),
                    f"says buffer.d_submodule={D + 1}"),
    "k_zero": (lambda f: edit_ae(f, lambda s: s.update({"k": torch.tensor(0, dtype=torch.int32)})),
               f"k 0 is not a positive integer up to d_sae={F}"),
    "k_too_big": (lambda f: edit_ae(f, lambda s: s.update({"k": torch.tensor(F + 1, dtype=torch.int32)})),
                  f"k {F + 1} is not a positive integer up to d_sae={F}"),
    "config_k": (lambda f: _config(f, lambda c: c["trainer"].update(k="four")), "config k='four' but ae.pt has k=4"),
    "int_weights": (lambda f: edit_ae(f, lambda s: s.update({"encoder.weight": s["encoder.weight"].to(torch.int32)})),
                    "encoder.weight int32"),
    "mixed_dtypes": (lambda f: edit_ae(f, lambda s: s.update({"encoder.bias": s["encoder.bias"].half()})),
                     "encoder.bias float16"),
    "layer": (lambda f: _config(f, lambda c: c["trainer"].update(layer="two")), "trainer.layer 'two' is not a layer"),
    "workbench_section": (lambda f: _config(f, lambda c: c.update(workbench=[1])), "workbench is a JSON list"),
    "eval_results": (lambda f: (f / dl.EVAL_FILE).write_text("[1, 2]"), "holds a JSON list, not an object"),
    "sparsity_shape": (lambda f: save_file({"sparsity": torch.zeros(F + 1)}, str(f / dl.SPARSITY_FILE)),
                       f"holds sparsity [{F + 1}] float32, not a float sparsity [{F}]"),
    "missing_config": (lambda f: (f / dl.CONFIG_FILE).unlink(), "has ae.pt but no config.json"),
}


@pytest.mark.parametrize("damage", list(DL_DAMAGE))
def test_inconsistent_dictionary_learning_folder_is_one_line(tmp_path, capsys, damage):
    src = dl_sae(tmp_path / "run" / "resid_post_layer_2" / "trainer_0")
    make, fragment = DL_DAMAGE[damage]
    make(src)
    refused(capsys, fragment, "convert", src, "--to", "saelens", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if damage != "missing_config":
        refused(capsys, fragment, "export", tmp_path / "run", "--to", "saelens", "--out", tmp_path / "export")
        assert not (tmp_path / "export").exists()


def test_the_trainable_loader_checks_shapes_the_same_way(tmp_path):
    """threshold and eval load BatchTopK folders through dl.load_folder: the same one-line shape check."""
    src = dl_sae(tmp_path / "sae", arch="matryoshka")
    edit_ae(src, lambda s: s.update({"W_dec": torch.zeros(F, D + 1)}))
    with pytest.raises(WorkbenchError, match=rf"the tensor shapes disagree \(W_enc \[{D}, {F}\], b_enc \[{F}\], "
                                             rf"W_dec \[{F}, {D + 1}\]"):
        dl.load_folder(src)


def test_matryoshka_groups_that_do_not_cover_the_dictionary_are_refused(tmp_path, capsys):
    src = dl_sae(tmp_path / "sae", arch="matryoshka")
    edit_ae(src, lambda s: s.update({"group_sizes": torch.tensor([16, 40])}))
    refused(capsys, f"group_sizes [16, 40] are not positive integers summing to dict_size {F}", "convert", src,
            "--to", "saelens", "--out", tmp_path / "out")


# ---- 6. SAELens folders a user can get wrong ----

def _cfg(folder: Path, change: Callable[[dict], object]) -> None:
    edit_json(folder / saelens.CFG_FILE, change)


def _weights(folder: Path, change: Callable[[dict], object]) -> None:
    edit_safetensors(folder / saelens.WEIGHTS_FILE, change)


SL_DAMAGE = {
    "no_d_in": ("jumprelu", lambda f: _cfg(f, lambda c: c.pop("d_in")), f"has no d_in (the weights say {D})"),
    "d_sae_string": ("jumprelu", lambda f: _cfg(f, lambda c: c.update(d_sae=str(F))), f"says d_sae='{F}'"),
    "topk_without_k": ("topk", lambda f: None, "has no k (a topk SAE keeps"),
    "topk_k_too_big": ("topk", lambda f: _cfg(f, lambda c: c.update(k=F + 1)),
                       f"k {F + 1} is not a positive integer up to d_sae={F}"),
    "flag_string": ("jumprelu", lambda f: _cfg(f, lambda c: c.update(apply_b_dec_to_input="yes")),
                    "apply_b_dec_to_input is 'yes', not true or false"),
    "metadata_list": ("jumprelu", lambda f: _cfg(f, lambda c: c.update(metadata=[1])), "metadata is a JSON list"),
    "details_string": ("jumprelu", lambda f: _cfg(f, lambda c: c["metadata"].update(training_architecture_details="k=4")),
                       "training_architecture_details is a JSON str"),
    "bad_widths": ("jumprelu", lambda f: _cfg(f, lambda c: c["metadata"].update(
        training_architecture_details={"k": K, "matryoshka_widths": [32, 16, F]})), "are not increasing integers"),
    "hook_number": ("jumprelu", lambda f: _cfg(f, lambda c: c["metadata"].update(hook_name=6)), "hook_name 6 is not"),
    "unknown_dtype": ("jumprelu", lambda f: _cfg(f, lambda c: c.update(dtype="int8")), "unknown dtype 'int8'"),
    "cfg_list": ("jumprelu", lambda f: (f / saelens.CFG_FILE).write_text("[1]"), "holds a JSON list, not an object"),
    "missing_threshold": ("jumprelu", lambda f: _weights(f, lambda t: t.pop("threshold")), "missing ['threshold']"),
    "extra_tensor": ("topk", lambda f: _weights(f, lambda t: t.update(b_mag=torch.zeros(F))), "unexpected ['b_mag']"),
    "W_dec_shape": ("jumprelu", lambda f: _weights(f, lambda t: t.update(W_dec=torch.zeros(F, D + 1))),
                    f"W_dec [{F}, {D + 1}]"),
    "threshold_0d": ("jumprelu", lambda f: _weights(f, lambda t: t.update(threshold=torch.tensor(0.2))), "threshold []"),
    "sparsity_name": ("jumprelu", lambda f: save_file({"freq": torch.zeros(F)}, str(f / saelens.SPARSITY_FILE)),
                      f"holds freq [{F}] float32, not a float sparsity [{F}]"),
    "missing_weights": ("jumprelu", lambda f: (f / saelens.WEIGHTS_FILE).unlink(),
                        "has cfg.json but no sae_weights.safetensors"),
}


@pytest.mark.parametrize("damage", list(SL_DAMAGE))
def test_wrong_saelens_folder_is_one_line(tmp_path, capsys, damage):
    arch, make, fragment = SL_DAMAGE[damage]
    src = sl_sae(tmp_path / "sl", arch=arch, k=K if arch == "topk" and damage != "topk_without_k" else None)
    make(src)
    refused(capsys, fragment, "convert", src, "--to", "dictionary_learning", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_neither_format_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, "holds neither ae.pt + config.json nor cfg.json + sae_weights.safetensors", "convert",
            tmp_path / "empty", "--to", "saelens", "--out", tmp_path / "out")
    (tmp_path / "a_file").write_text("x")
    refused(capsys, "is not a directory", "convert", tmp_path / "a_file", "--to", "saelens", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- 4. existing output folders ----

def test_convert_into_a_folder_holding_another_sae_is_refused_and_leaves_it_intact(tmp_path, capsys):
    other = sl_sae(tmp_path / "other")  # an SAE the workbench did not write there
    before = digest(other)
    refused(capsys, f"--out {other} is not empty and was not written by `workbench convert`", "convert",
            dl_sae(tmp_path / "a"), "--to", "saelens", "--out", other)
    assert digest(other) == before


def test_convert_into_the_output_of_another_source_is_refused(tmp_path, capsys):
    a, b, out = dl_sae(tmp_path / "a", seed=0), dl_sae(tmp_path / "b", seed=1), tmp_path / "out"
    convert(a, "saelens", out)
    before = digest(out)
    line = refused(capsys, f"holds the output of `workbench convert` from {a.resolve()} (saelens)", "convert", b,
                   "--to", "saelens", "--out", out)
    assert "pass a new --out or delete it" in line
    assert digest(out) == before


def test_reconverting_the_same_sae_rewrites_identically_and_leaves_no_stale_file(tmp_path):
    """The old SAE's sparsity.safetensors must not survive a conversion of an SAE without one."""
    src, out = dl_sae(tmp_path / "a", sparsity=True), tmp_path / "out"
    convert(src, "saelens", out)
    first = digest(out)
    assert saelens.SPARSITY_FILE in first and MARKER in first
    convert(src, "saelens", out)
    assert digest(out) == first  # idempotent
    (src / dl.SPARSITY_FILE).unlink()
    convert(src, "saelens", out)
    convert(src, "saelens", tmp_path / "fresh")
    assert saelens.SPARSITY_FILE not in digest(out)
    assert {n: h for n, h in digest(out).items() if n != MARKER} == {n: h for n, h in digest(tmp_path / "fresh").items()
                                                                      if n != MARKER}


def run_of(root: Path, layers: tuple[int, ...] = (2, 3), seed: int = 0) -> Path:
    for layer in layers:
        dl_sae(root / f"resid_post_layer_{layer}" / "trainer_0", seed=seed + layer, layer=layer, sparsity=layer == 2)
    return root


@pytest.mark.parametrize("to", ["saelens", "dictionary_learning"])
def test_export_into_an_export_of_another_run_is_refused_and_keeps_both_the_sae_files_and_the_card(tmp_path, capsys, to):
    run1, run2, out = run_of(tmp_path / "run1"), run_of(tmp_path / "run2", seed=10), tmp_path / "export"
    export_run(run1, to, out)
    before = digest(out)
    refused(capsys, f"holds the output of `workbench export` from {run1.resolve()} ({to})", "export", run2,
            "--to", to, "--out", out)
    assert digest(out) == before


def test_export_into_a_folder_with_other_files_or_of_another_format_is_refused(tmp_path, capsys):
    run, out = run_of(tmp_path / "run"), tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(capsys, "is not empty and was not written by `workbench export` (notes.txt)", "export", run, "--to",
            "saelens", "--out", out)
    assert digest(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    export_run(run, "saelens", tmp_path / "sl")
    refused(capsys, "(saelens), not of this export", "export", run, "--to", "dictionary_learning", "--out", tmp_path / "sl")


def test_reexport_of_the_same_run_is_identical_and_drops_saes_the_run_no_longer_has(tmp_path):
    """What the pipeline's export stage does when it runs again (after a recipe change or a kill)."""
    run, out = run_of(tmp_path / "run"), tmp_path / "export"
    export_run(run, "saelens", out)
    first = digest(out)
    assert any(n.startswith("blocks.3.hook_resid_post/") for n in first)
    export_run(run, "saelens", out)
    assert digest(out) == first
    shutil.rmtree(run / "resid_post_layer_3")
    export_run(run, "saelens", out)
    export_run(run, "saelens", tmp_path / "fresh")
    assert digest(out) == digest(tmp_path / "fresh")  # the marker too: same run, same files
    assert not (out / "blocks.3.hook_resid_post").exists()


def test_a_marker_that_points_outside_the_folder_is_refused(tmp_path, capsys):
    run, out = run_of(tmp_path / "run"), tmp_path / "export"
    export_run(run, "saelens", out)
    (tmp_path / "precious.txt").write_text("keep")
    edit_json(out / MARKER, lambda m: m["files"].append("../precious.txt"))
    refused(capsys, "is damaged", "export", run, "--to", "saelens", "--out", out)
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_two_saes_that_would_share_an_export_folder_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    dl_sae(run / "a" / "resid_post_layer_2" / "trainer_0", layer=2)
    dl_sae(run / "b" / "resid_post_layer_2" / "trainer_0", layer=2, seed=1)
    refused(capsys, "would both export to", "export", run, "--to", "dictionary_learning", "--out", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_an_sae_without_a_layer_cannot_be_named_in_an_export(tmp_path, capsys):
    run = run_of(tmp_path / "run", layers=(2,))
    edit_json(run / "resid_post_layer_2" / "trainer_0" / dl.CONFIG_FILE, lambda c: c["trainer"].update(layer=None))
    refused(capsys, "config.json records no trainer.layer", "export", run, "--to", "saelens", "--out", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_hand_edited_values_the_model_card_shows_are_one_line_or_shown_as_unmeasured(tmp_path, capsys):
    run = run_of(tmp_path / "run", layers=(2,))
    folder = run / "resid_post_layer_2" / "trainer_0"
    edit_json(folder / dl.EVAL_FILE, lambda e: e.update(l0="n/a"))
    export_run(run, "saelens", tmp_path / "export")
    assert "| 2 | `blocks.2.hook_resid_post` | 64 | - | 0.800 |" in (tmp_path / "export" / "README.md").read_text()
    edit_json(folder / dl.CONFIG_FILE, lambda c: c["workbench"].update(sink_multiple="ten"))
    refused(capsys, "workbench.sink_multiple is 'ten', not a number", "export", run, "--to", "saelens", "--out",
            tmp_path / "export2")
    assert not (tmp_path / "export2").exists()


# ---- 5. writes that fail ----

def test_out_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    src, run = uniform_sl(tmp_path / "sl"), run_of(tmp_path / "run")
    for args in (("convert", src, "--to", "dictionary_learning"), ("export", run, "--to", "saelens")):
        line = refused(capsys, f"cannot write {blocker / 'out'}", *args, "--out", blocker / "out")
        assert "Not a directory; a parent of it is a file: choose another output directory" in line
        refused(capsys, f"--out {blocker} is a file", *args, "--out", blocker)
    assert blocker.read_text() == "not a directory"


def file_size_limit(n: int) -> Callable[[], None]:
    """preexec_fn: writes past n bytes fail with EFBIG, as a full disk fails with ENOSPC (SIGXFSZ ignored
    so that the write returns the error instead of killing the process)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return limit


def workbench(*args: object, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=preexec_fn, timeout=300)


FULL_DISK = {  # each writes a file larger than the limit first: torch.save, the streamed safetensors, a copy
    "convert_to_dictionary_learning": ("convert", "sl", "dictionary_learning", dl.AE_FILE),
    "convert_to_saelens": ("convert", "dl", "saelens", saelens.WEIGHTS_FILE),
    "export_dictionary_learning": ("export", "run", "dictionary_learning", None),
    "export_saelens": ("export", "run", "saelens", None),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_a_full_disk_is_one_line_leaves_no_partial_file_and_a_rerun_finishes(tmp_path, case):
    command, kind, to, first_file = FULL_DISK[case]
    src = {"sl": lambda: uniform_sl(tmp_path / "sl"), "dl": lambda: dl_sae(tmp_path / "dl"),
           "run": lambda: run_of(tmp_path / "run")}[kind]()
    out = tmp_path / "out"
    proc = workbench(command, src, "--to", to, "--out", out, preexec_fn=file_size_limit(4096))
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr, command)
    assert "File too large; free disk space (or raise `ulimit -f`)" in line, line
    written = digest(out)
    assert not [n for n in written if n.endswith(".tmp")]
    assert all((out / n).stat().st_size <= 4096 for n in written)  # nothing cut off at the limit...
    if first_file:
        assert first_file not in written  # ...and no partial file under its final name
    assert main([command, str(src), "--to", to, "--out", str(out)]) == 0  # the same command, with space again
    assert main([command, str(src), "--to", to, "--out", str(tmp_path / "fresh")]) == 0
    assert {n: h for n, h in digest(out).items() if n != MARKER} == {
        n: h for n, h in digest(tmp_path / "fresh").items() if n != MARKER}


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(),
                    reason="needs user and mount namespaces (unshare -rm) for a real read-only filesystem")
def test_a_read_only_output_is_one_line_and_keeps_the_earlier_export(tmp_path):
    """A real read-only filesystem (root ignores file permissions, so chmod cannot show it): the earlier
    export is bind-mounted read-only in a private mount namespace, and re-exported into."""
    run, out = run_of(tmp_path / "run"), tmp_path / "export"
    export_run(run, "saelens", out)
    before = digest(out)
    cmd = (f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && "
           f"{sys.executable} -m workbench export {run} --to saelens --out {out}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr, "export")
    assert f"cannot write {out / MARKER}: Read-only file system; the filesystem is read-only" in line, line
    assert digest(out) == before
