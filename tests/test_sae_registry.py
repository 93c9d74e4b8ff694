"""The architecture registry: each record finds its module, its dictionary_learning class and its
SAELens training architecture, its weights-size formula is the size of the saved tensors, a recipe may
set exactly its recipe keys, and reading a recipe's module does not load torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from workbench.config import SAEConfig, load_recipe
from workbench.errors import WorkbenchError
from workbench.sae.registry import ARCHITECTURES, BY_DICT_CLASS, architecture_of, holding

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
D, F, K, FRACTIONS = 16, 64, 4, [0.25, 0.75]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_record_finds_its_module_and_the_module_finds_its_record(name):
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    sae = arch.build(D, F, K, FRACTIONS)
    assert type(sae) is arch.module and (sae.activation_dim, sae.dict_size, int(sae.k)) == (D, F, K)
    assert architecture_of(sae) is arch and BY_DICT_CLASS[arch.dict_class] is arch
    assert type(sae).__name__ == arch.dict_class  # the module mirrors dictionary_learning's class
    sizes = arch.group_sizes(F, FRACTIONS)
    assert sizes == (sae.group_sizes.tolist() if arch.grouped else None)
    assert holding(sizes) is arch  # converted weights with these groups land on this architecture
    loaded = arch.module.from_state_dict(sae.state_dict())
    assert type(loaded) is arch.module
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sae.state_dict().items())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_weights_size_is_the_size_of_the_saved_tensors(name):
    arch = ARCHITECTURES[name]
    sae = arch.build(D, F, K, FRACTIONS)
    saved = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    assert arch.weights_bytes(D, F, arch.group_sizes(F, FRACTIONS)) == saved


def test_the_saelens_names_are_saelens_training_architectures():
    import sae_lens  # noqa: F401  (registers its architectures)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    classes = {name: SAE_TRAINING_CLASS_REGISTRY[a.saelens_architecture][0].__name__
               for name, a in ARCHITECTURES.items()}
    assert classes == {"batchtopk": "BatchTopKTrainingSAE", "matryoshka": "MatryoshkaBatchTopKTrainingSAE"}


def test_the_recipe_keys_are_sae_config_fields():
    for arch in ARCHITECTURES.values():
        assert set(arch.recipe_keys) <= {f.name for f in fields(SAEConfig)}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("key", ["group_fractions", "group_weights"])
def test_a_recipe_sets_a_group_key_only_for_an_architecture_that_takes_it(name, key):
    arch = ARCHITECTURES[name]
    given = {"group_fractions": FRACTIONS, "group_weights": [1.0, 2.0]}
    sae = {"name": "a", "arch": name, "width": F, "k": K, key: given[key]}
    if "group_fractions" in arch.recipe_keys:
        sae["group_fractions"] = FRACTIONS  # required with groups
    override = f"train.saes=[{json.dumps(sae)}]"
    if key in arch.recipe_keys:
        assert getattr(load_recipe(DEMO, [override]).train.saes[0], key) == given[key]
    else:
        with pytest.raises(WorkbenchError, match=r"train\.saes\[0\] \(a\)\.group_fractions and group_weights are "
                                                 "for arch matryoshka only; remove them or set arch: matryoshka"):
            load_recipe(DEMO, [override])


def test_an_unknown_arch_names_the_registry_architectures():
    with pytest.raises(WorkbenchError, match=r"train\.saes\[0\] \(a\)\.arch must be one of batchtopk, matryoshka \(got 'topk'\)"):
        load_recipe(DEMO, ["train.saes=[{name: a, arch: topk}]"])


def test_importing_the_recipe_module_does_not_load_torch():
    code = "import sys, workbench.config; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
