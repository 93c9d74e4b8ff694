"""The model, data and collect sections of a recipe: names, defaults, and one clear error per mistake."""

from __future__ import annotations

import pytest

from workbench.config import load_recipe
from workbench.errors import WorkbenchError


def test_the_keys_the_issue_names_exist_with_their_defaults():
    r = load_recipe(None)
    assert (r.model.name, r.model.dtype, r.model.trust_remote_code) == ("embedded:tiny-qwen3", "auto", False)
    assert (r.data.path, r.data.text_key, r.data.packing) == ("embedded:corpus", "text", True)
    assert r.data.context_length > 0 and r.data.num_tokens > 0
    c = r.collect
    assert (c.sink_multiple, c.sink_median, c.drop_first_token, c.layers) == (10.0, "real", True, [0.5])
    assert c.batch_size > 0 and c.out


@pytest.mark.parametrize("override,message", [
    ("data.contxt_length=5", "unknown recipe key 'data.contxt_length' (did you mean 'data.context_length'?)"),
    ("model.dtyp=float32", "unknown recipe key 'model.dtyp' (did you mean 'model.dtype'?)"),
    ("collect.sink_multple=3", "unknown recipe key 'collect.sink_multple' (did you mean 'collect.sink_multiple'?)"),
    ("colect.layers=[1]", "unknown recipe key 'colect' (did you mean 'collect'?)"),
    ("model.dtype=int8", "model.dtype must be one of auto, bfloat16, float16, float32"),
    ("collect.store_dtype=int8", "collect.store_dtype must be one of model, bfloat16, float16, float32"),
    ("collect.sink_multiple=0", "collect.sink_multiple must be > 0 or null"),
    ("collect.layers=[1.5]", "collect.layers entry 1.5 is a float outside (0, 1)"),
    ("collect.layers=[]", "collect.layers is empty"),
    ("collect.batch_size=0", "collect.batch_size must be > 0"),
    ("data.num_tokens=-1", "data.num_tokens must be > 0"),
    ("collect.batch_size=eight", "recipe key 'collect.batch_size' has a bad value"),
])
def test_a_mistake_in_the_collection_sections_names_the_key(override, message):
    with pytest.raises(WorkbenchError) as err:
        load_recipe(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_null_turns_the_sink_filter_off_and_fractions_mix_with_indices():
    r = load_recipe(None, ["collect.sink_multiple=null", "collect.layers=[0.25,3,-1]"])
    assert r.collect.sink_multiple is None and r.collect.layers == [0.25, 3, -1]


@pytest.mark.parametrize("num_layers,expected", [(28, [7, 14, 21]), (36, [9, 18, 27]), (40, [10, 20, 30]),
                                                 (64, [16, 32, 48]), (4, [1, 2, 3])])
def test_depth_fractions_resolve_to_the_published_layers(num_layers, expected):
    from workbench.model import resolve_layers

    assert resolve_layers([0.25, 0.5, 0.75], num_layers) == expected
    assert resolve_layers([0.75, -1, 0.25, 0.25], num_layers) == sorted({expected[0], expected[2], num_layers - 1})
