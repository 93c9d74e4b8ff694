"""`workbench verify`: every SAE folder the workbench writes (a training run, both export formats), run by
its reference library in a separate process, matches the workbench's own module on random and real
activations; and a mismatch, or a folder that does not load, makes it fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import workbench.verify as verify_module
from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.export import export_run
from workbench.formats import dictionary_learning as dl
from workbench.formats.convert import load_sae
from workbench.formats.weights import InferenceSAE, SAEWeights
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A small demo cache, a run of SAEs on its layers (d_model 64), and that run exported both ways."""
    root = tmp_path_factory.mktemp("verify")
    cache = root / "cache"
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [f"collect.out={cache}", "data.num_tokens=4096"]))
    torch.manual_seed(0)
    for layer in (2, 3):
        for name, sae in (("trainer_0", BatchTopKSAE(64, 256, 8)), ("trainer_1", MatryoshkaBatchTopKSAE(64, 256, 8, [64, 192]))):
            with torch.no_grad():
                sae.threshold.fill_(0.05)
                sae.b_dec.normal_()
            trainer = dl.trainer_section(sae, lr=1e-3, steps=10, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                         threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=layer,
                                         lm_name="embedded:tiny-qwen3", group_fractions=[0.25, 0.75] if name == "trainer_1" else None,
                                         group_weights=None)
            config = {"trainer": trainer, "buffer": dl.buffer_section(64, 128, 1, 16, 512, "cpu"),
                      "workbench": {"cache": str(cache), "sink_multiple": 10.0}}
            dl.save_folder(sae, root / "run" / f"resid_post_layer_{layer}" / name, config)
    export_run(root / "run", "dictionary_learning", root / "export" / "dictionary_learning")
    export_run(root / "run", "saelens", root / "export" / "saelens")
    return {"root": root, "cache": cache, "run": root / "run", "export": root / "export"}


def test_every_format_the_workbench_writes_matches_its_reference_library(exported, capsys):
    code = main(["verify", str(exported["export"]), "--cache", str(exported["cache"])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, "\n".join(lines)
    assert len(lines) == 9 and lines[-1] == "8 of 8 SAEs match their reference library"
    assert sum("[dictionary_learning BatchTopKSAE]" in line for line in lines) == 2
    assert sum("[dictionary_learning MatryoshkaBatchTopKSAE]" in line for line in lines) == 2
    assert sum("[sae_lens jumprelu]" in line for line in lines) == 4
    assert all(line.startswith("OK") and "(random+cache)" in line for line in lines[:-1])


def test_a_mismatch_fails_verify_and_names_the_sae(exported, monkeypatch, capsys):
    """Tampered weights on the workbench's side (the reference process still reads the file)."""
    tampered = exported["export"] / "saelens" / "blocks.2.hook_resid_post" / "trainer_0"

    def load_tampered(folder):
        module = load_sae(folder)
        if Path(folder) == tampered:
            with torch.no_grad():
                module.W_dec.mul_(1.001)
        return module

    monkeypatch.setattr(verify_module, "load_sae", load_tampered)
    code = main(["verify", str(exported["export"] / "saelens")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    bad = [line for line in lines if line.startswith("FAIL")]
    assert len(bad) == 1 and "blocks.2.hook_resid_post/trainer_0" in bad[0]
    assert "exceeds tolerance 1e-05: decode/random, forward/random" in bad[0]
    assert lines[-1] == "3 of 4 SAEs match their reference library; 1 do not"


def test_a_folder_that_does_not_load_fails_verify(exported, tmp_path, capsys):
    """Tampered on disk: ae.pt's k no longer matches config.json (dictionary_learning refuses it too)."""
    folder = tmp_path / "resid_post_layer_2" / "trainer_0"
    folder.mkdir(parents=True)
    source = exported["run"] / "resid_post_layer_2" / "trainer_0"
    state = torch.load(source / dl.AE_FILE, weights_only=True)
    state["k"] = torch.tensor(9, dtype=torch.int32)
    torch.save(state, folder / dl.AE_FILE)
    (folder / dl.CONFIG_FILE).write_text((source / dl.CONFIG_FILE).read_text())
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL resid_post_layer_2/trainer_0") and "config k=8 but ae.pt has k=9" in out
    config = json.loads((folder / dl.CONFIG_FILE).read_text())
    assert config["trainer"]["k"] == 8


def _outputs(module: torch.nn.Module, x_ND: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        f_NF = module.encode(x_ND)
        return {"encode": f_NF, "decode": module.decode(f_NF), "forward": module.decode(f_NF)}


def _compare(module: torch.nn.Module, x_ND: torch.Tensor, ours: dict, ref: dict) -> verify_module.Check:
    """verify's comparison of our outputs with a reference's (made up here) on inputs x_ND."""
    check = verify_module.Check(folder=Path("sae"), fmt="saelens")
    with torch.no_grad():
        allowed = {k: check.tolerance * m for k, m in verify_module._magnitudes(module, x_ND, ours["encode"]).items()}
    cut = (getattr(module, "activation", "jumprelu"), getattr(module, "threshold", None))
    verify_module._compare(check, ours, ref, allowed, cut, num_random=len(x_ND))
    return check


def _drop(module, outputs: dict, n: int, j: int, value: float | None = None) -> dict:
    """The outputs with latent j of token n set to `value` (default 0), decoded again."""
    f_NF = outputs["encode"].clone()
    f_NF[n, j] = 0.0 if value is None else value
    with torch.no_grad():
        return {"encode": f_NF, "decode": outputs["decode"], "forward": module.decode(f_NF)}


def test_a_latent_on_its_threshold_may_fire_on_one_side_only_and_one_elsewhere_may_not():
    """Rounding decides the side of a pre-activation within the tolerance of the threshold; anywhere else
    a latent that fires on one side only is a mismatch."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(64, 256, 8)
    x_ND = torch.randn(32, 64) * 3
    with torch.no_grad():
        pre_NF = sae.pre_acts(x_ND)
        magnitude_NF = verify_module._magnitudes(sae, x_ND, pre_NF)["encode"]
        n, j = 5, int(pre_NF[5].argmax())
        sae.threshold.fill_(float(pre_NF[n, j] - 0.1 * 1e-5 * magnitude_NF[n, j]))  # on the threshold
    ours = _outputs(sae, x_ND)
    assert ours["encode"][n, j] > 0 and int((ours["encode"] != 0).sum()) > 1
    on_the_cut = _compare(sae, x_ND, ours, _drop(sae, ours, n, j))
    assert on_the_cut.ok and on_the_cut.flips == 1
    line = verify_module.format_report([on_the_cut], Path("."))
    assert "1 latents on their threshold fired on one side only" in line and line.startswith("OK")

    with torch.no_grad():
        sae.threshold.fill_(float(pre_NF[n, j]) - 0.5)  # now the latent sits 0.5 above it
    ours = _outputs(sae, x_ND)
    away = _compare(sae, x_ND, ours, _drop(sae, ours, n, j))
    assert not away.ok and away.flips == 0 and away.exceeded == ["encode/random", "forward/random"]


def test_a_top_k_swap_at_the_cut_is_rounding_and_a_lost_latent_is_not():
    g = torch.Generator().manual_seed(1)
    D, F = 16, 64
    weights = SAEWeights(W_enc_DF=torch.randn(D, F, generator=g), b_enc_F=torch.zeros(F),
                         W_dec_FD=torch.randn(F, D, generator=g), b_dec_D=torch.zeros(D), activation="topk", k=4)
    sae = InferenceSAE(weights)
    x_ND = torch.randn(8, D, generator=g)
    ours = _outputs(sae, x_ND)
    f_F = ours["encode"][3]
    kept = f_F.nonzero().flatten()
    smallest = int(kept[f_F[kept].argmin()])
    other = int((f_F == 0).nonzero()[0])
    swapped = _drop(sae, _drop(sae, ours, 3, smallest), 3, other, value=float(f_F[smallest]))
    swap = _compare(sae, x_ND, ours, swapped)
    assert swap.ok and swap.flips == 2
    lost = _compare(sae, x_ND, ours, _drop(sae, ours, 3, smallest))
    assert not lost.ok and "encode/random" in lost.exceeded
