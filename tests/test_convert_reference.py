"""Proof against the real libraries: checkpoints written by dictionary_learning 0.1.0's own trainers
(trainSAE: ae.pt + config.json) and by SAELens' own save_model / save_inference_model convert both ways,
load in the other library, and give the same outputs (within 1e-5 of the output scale, fp32: the two
libraries round their products differently, see conftest.FP32_TOL; the same latents fire, bar one whose
pre-activation sits on the threshold); converting A -> B -> A gives back the same tensors, bit for bit (they
are copies).

The libraries run only in subprocesses (dictionary_learning imports nnsight, which patches torch): one
process makes each library's checkpoints, and one process per library computes all reference outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale, assert_codes_close, cut_of
from safetensors.torch import load_file

from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import convert, load_sae
from workbench.verify import run_reference

D, F = 32, 128

MAKE_DICTIONARY_LEARNING = r"""
import sys, torch
from dictionary_learning.training import trainSAE
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
from dictionary_learning.trainers.top_k import TopKTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.standard import StandardTrainer

D, F = 32, 128
class Data:  # stands in for ActivationBuffer: an iterator of [B, D] batches with a `config`
    config = {"d_submodule": D, "io": "out", "n_ctxs": 8, "ctx_len": 128, "refresh_batch_size": 4,
              "out_batch_size": 256, "device": "cpu"}
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        basis = torch.randn(64, D, generator=g)
        while True:
            codes = torch.relu(torch.randn(256, 64, generator=g)) * (torch.rand(256, 64, generator=g) < 0.1)
            yield 3.0 * (codes @ basis + 0.1 * torch.randn(256, D, generator=g)) + 1.0
common = dict(steps=30, activation_dim=D, dict_size=F, layer=3, lm_name="Qwen/Qwen3-8B", device="cpu", seed=0)
btk = dict(k=8, warmup_steps=5, threshold_start_step=10)
configs = [dict(trainer=BatchTopKTrainer, **common, **btk),
           dict(trainer=MatryoshkaBatchTopKTrainer, group_fractions=[0.25, 0.75], **common, **btk),
           dict(trainer=TopKTrainer, **common, **btk),
           dict(trainer=JumpReluTrainer, warmup_steps=5, sparsity_warmup_steps=5, **common),
           dict(trainer=StandardTrainer, warmup_steps=5, sparsity_warmup_steps=5, **common)]
trainSAE(Data(), configs, steps=30, save_dir=sys.argv[1], normalize_activations=True, device="cpu")
"""

MAKE_SAELENS = r"""
import sys, torch
from pathlib import Path
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

out, D, F = Path(sys.argv[1]), 32, 128
torch.manual_seed(0)
def meta():
    return SAEMetadata(model_name="google/gemma-3-1b-pt", hook_name="blocks.6.hook_resid_post", context_size=1024,
                       prepend_bos=True, dataset_path="monology/pile-uncopyrighted")
def randomize(sae, threshold=None):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.startswith("b_") else D ** -0.5))
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae
saes = {
    "jumprelu_vector": randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta())), torch.rand(F) * 0.5),
    "jumprelu_vector_no_b_dec": randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False,
                                                                         metadata=meta())), torch.rand(F) * 0.5),
    "topk": randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=8, metadata=meta()))),
    "topk_rescaled_no_b_dec": randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=8, rescale_acts_by_decoder_norm=True,
                                                              apply_b_dec_to_input=False, metadata=meta()))),
    "standard_no_b_dec": randomize(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False, metadata=meta()))),
}
with torch.no_grad():  # unit-norm decoder rows: what dictionary_learning's AutoEncoder can hold
    saes["standard_no_b_dec"].W_dec.div_(saes["standard_no_b_dec"].W_dec.norm(dim=1, keepdim=True))
for name, sae in saes.items():
    sae.save_model(out / name)
for name, cls, cfg_cls, extra in [
        ("batchtopk", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {}),
        ("matryoshka", MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, {"matryoshka_widths": [32, 128]})]:
    sae = randomize(cls(cfg_cls(d_in=D, d_sae=F, k=8, metadata=meta(), **extra)))
    sae.topk_threshold = torch.tensor(0.25, dtype=torch.double)
    sae.save_inference_model(out / name)  # SAELens saves finished BatchTopK SAEs as jumprelu
"""

# Conversions that fold a setting the target cannot hold (exact math, not bit-identical tensors): for
# these, B -> A -> B is checked bit for bit instead of A -> B -> A.
FOLDED = {"jumprelu_vector", "topk_rescaled_no_b_dec", "standard_no_b_dec"}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / dl.AE_FILE).is_file():
        return torch.load(folder / dl.AE_FILE, weights_only=True)
    return dict(sorted(load_file(str(folder / saelens.WEIGHTS_FILE)).items()))


def config_text(folder: Path) -> dict:
    name = dl.CONFIG_FILE if (folder / dl.AE_FILE).is_file() else saelens.CFG_FILE
    return json.loads((folder / name).read_text())


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Library-made checkpoints, every conversion and round trip, and reference outputs of all of them."""
    root = tmp_path_factory.mktemp("reference")
    for script, where in ((MAKE_DICTIONARY_LEARNING, root / "dl"), (MAKE_SAELENS, root / "sl")):
        subprocess.run([sys.executable, "-c", script, str(where)], check=True, capture_output=True, cwd=root)
    names = {"dl": sorted(p.name for p in (root / "dl").iterdir()), "sl": sorted(p.name for p in (root / "sl").iterdir())}
    for name in names["dl"]:
        convert(root / "dl" / name, "saelens", root / "dl_to_sl" / name)
        convert(root / "dl_to_sl" / name, "dictionary_learning", root / "dl_rt" / name)
    for name in names["sl"]:
        convert(root / "sl" / name, "dictionary_learning", root / "sl_to_dl" / name)
        convert(root / "sl_to_dl" / name, "saelens", root / "sl_rt" / name)
        convert(root / "sl_rt" / name, "dictionary_learning", root / "sl_rt_dl" / name)
    g = torch.Generator().manual_seed(0)
    # Unit-scale inputs for the SAELens-made SAEs, raw-scale ones (norms ~30) for the trained ones.
    x = torch.cat([torch.randn(128, D, generator=g), 5 * torch.randn(128, D, generator=g) + 1,
                   30 * torch.randn(128, D, generator=g) + 1])
    f = torch.relu(torch.randn(len(x), F, generator=g)) * (torch.rand(len(x), F, generator=g) < 0.1)
    folders = {"dictionary_learning": [], "saelens": []}
    for group in ("dl", "dl_rt", "sl_to_dl", "sl_rt_dl"):
        folders["dictionary_learning"] += [root / group / n for n in names["sl" if group.startswith("sl") else "dl"]]
    for group in ("sl", "sl_rt", "dl_to_sl"):
        folders["saelens"] += [root / group / n for n in names["dl" if group.startswith("dl") else "sl"]]
    outputs: dict[Path, dict | str] = {}
    for fmt, fs in folders.items():
        outputs.update(zip(fs, run_reference(fmt, fs, [{"x": x, "f": f}] * len(fs)), strict=True))
    return {"root": root, "names": names, "x": x, "f": f, "outputs": outputs}


def assert_same_outputs(got: dict, want: dict, module: torch.nn.Module, what: str) -> None:
    """encode(x), decode(f) and forward(x) of one SAE computed two ways (two libraries, or a library and the
    workbench): the codes within FP32_TOL bar a latent flipping at `module`'s cut (conftest.assert_codes_close),
    decode within FP32_TOL (both decoders get the same f), forward within FP32_TOL on the rows without a flip."""
    flip_rows_N = assert_codes_close(got["encode"], want["encode"], cut_of(module, want["encode"]), what=f"{what} encode")
    assert_close_to_scale(got["decode"], want["decode"], what=f"{what} decode")
    assert_close_to_scale(got["forward"][~flip_rows_N], want["forward"][~flip_rows_N], what=f"{what} forward")


def test_every_checkpoint_loads_in_its_reference_library(world):
    failed = {str(p): out for p, out in world["outputs"].items() if isinstance(out, str)}
    assert not failed


@pytest.mark.parametrize("direction", ["dl", "sl"])
def test_converted_checkpoints_give_the_same_outputs_in_the_other_library(world, direction):
    root, outputs = world["root"], world["outputs"]
    target = "dl_to_sl" if direction == "dl" else "sl_to_dl"
    for name in world["names"][direction]:
        source, converted = outputs[root / direction / name], outputs[root / target / name]
        assert bool((source["encode"] > 0).any()), f"{name}: no latent fires on the test inputs"
        assert_same_outputs(converted, source, load_sae(root / direction / name), f"{direction}/{name} -> {target}")


def test_batchtopk_equals_the_converted_jumprelu_across_libraries(world):
    """dictionary_learning's BatchTopKSAE (nn.Linear) and SAELens' JumpReLU (matmul plus b_enc) with its
    threshold broadcast: the same latents fire with the same values, to fp32 rounding."""
    root, out = world["root"], world["outputs"]
    for a, b in (("dl/trainer_0", "dl_to_sl/trainer_0"), ("dl/trainer_1", "dl_to_sl/trainer_1"),
                 ("sl/batchtopk", "sl_to_dl/batchtopk"), ("sl/matryoshka", "sl_to_dl/matryoshka")):
        f_a = out[root / a]["encode"]
        assert bool((f_a > 0).any()) and bool((f_a == 0).any()), a
        cut = cut_of(load_sae(root / a), f_a)
        assert float(cut.min()) > 0, a  # a JumpReLU that really jumps
        assert_codes_close(out[root / b]["encode"], f_a, cut, what=f"{a} vs {b}")
        assert_close_to_scale(out[root / b]["decode"], out[root / a]["decode"], what=f"{a} vs {b} decode")


def test_round_trips_give_back_the_same_tensors_and_config(world):
    root = world["root"]
    for name in world["names"]["dl"]:
        assert same_tensors(tensors(root / "dl" / name), tensors(root / "dl_rt" / name)), name
        assert config_text(root / "dl" / name) == config_text(root / "dl_rt" / name), name
    for name in world["names"]["sl"]:
        if name in FOLDED:
            assert same_tensors(tensors(root / "sl_to_dl" / name), tensors(root / "sl_rt_dl" / name)), name
        else:
            assert same_tensors(tensors(root / "sl" / name), tensors(root / "sl_rt" / name)), name
            assert config_text(root / "sl" / name) == config_text(root / "sl_rt" / name), name


def test_workbench_modules_match_the_reference_library_on_every_folder(world):
    """What `workbench verify` checks, for every format and class written here."""
    x, f = world["x"], world["f"]
    for folder, ref in world["outputs"].items():
        with torch.no_grad():
            module = load_sae(folder)
            ours = {"encode": module.encode(x), "decode": module.decode(f), "forward": module(x)}
        assert_same_outputs(ours, ref, module, str(folder))


def test_converted_classes_are_the_expected_ones(world):
    root = world["root"]
    dict_class = {n: dl.read_config(root / "sl_to_dl" / n)["trainer"]["dict_class"] for n in world["names"]["sl"]}
    assert dict_class == {"batchtopk": "BatchTopKSAE", "matryoshka": "MatryoshkaBatchTopKSAE",
                          "jumprelu_vector": "JumpReluAutoEncoder", "jumprelu_vector_no_b_dec": "JumpReluAutoEncoder",
                          "standard_no_b_dec": "AutoEncoder", "topk": "AutoEncoderTopK",
                          "topk_rescaled_no_b_dec": "AutoEncoderTopK"}
    arch = {n: json.loads((root / "dl_to_sl" / n / saelens.CFG_FILE).read_text())["architecture"] for n in world["names"]["dl"]}
    assert arch == {"trainer_0": "jumprelu", "trainer_1": "jumprelu", "trainer_2": "topk", "trainer_3": "jumprelu",
                    "trainer_4": "standard"}
    assert dl.read_config(root / "sl_to_dl" / "matryoshka")["trainer"]["group_sizes"] == [32, 96]
