"""The workbench section's schema (workbench/provenance.py): exact round trips, old and newer files,
one-line errors for wrong types, and the recorded-null vs absent distinction the sink filter relies on."""

import json

import pytest

from workbench.config import CollectConfig
from workbench.errors import WorkbenchError
from workbench.provenance import SCHEMA_VERSION, Provenance, ThresholdHistory, recorded_filter

# A section as `workbench train` then `workbench threshold` write it (the demo's layer-2 trainer_0, values shortened).
SECTION = {
    "arch": "batchtopk", "model": "embedded:tiny-qwen3", "dataset": "embedded:corpus", "layer": 2,
    "sink_multiple": 10.0, "sink_median": "real", "drop_first_token": True, "normalize_activations": False,
    "norm_factor": 1.0, "k_anneal_steps": None, "cache": "/runs/demo/cache", "cache_fingerprint": "ab12",
    "holdout_fraction": 0.125, "eval_tokens": 16384, "tokens_trained": 1048576, "steps": 2048, "batch_size": 512,
    "data_lanes": 1, "dead_feature_threshold": 10000000, "autocast_dtype": None, "init_from": None,
    "train_fingerprint": "cd34", "version": 1,
    "threshold": {"value": 0.5, "method": "l0", "previous": {"threshold": 0.4, "method": "ema"}, "ema": 0.4,
                  "batch_size": 512, "num_tokens": 16384, "split": "held-out",
                  "report": {"l0": {"threshold": 0.5, "l0": 16.0, "fve": 0.9}, "batch_topk": {"l0": 16.0, "fve": 0.91}}},
}


def test_a_written_section_round_trips_to_the_same_json():
    p = Provenance.from_dict(SECTION, "config.json")
    assert json.dumps(p.to_dict()) == json.dumps(SECTION)  # same keys, same order, same values
    assert (p.version, p.sink_multiple, p.layer, p.threshold.method, p.threshold_method) == (1, 10.0, 2, "l0", "l0")


def test_a_new_section_records_every_key_and_the_version():
    p = Provenance(arch="matryoshka", layer=3)
    d = p.to_dict()
    assert d["version"] == SCHEMA_VERSION and d["arch"] == "matryoshka" and d["init_from"] is None
    assert list(d)[:-1] == list(Provenance._TYPES) and "threshold" not in d
    p.threshold = ThresholdHistory(value=0.1, method="batch-min")
    assert list(p.to_dict())[-1] == "threshold" and p.to_dict()["threshold"]["method"] == "batch-min"


def test_an_old_section_without_version_or_with_fewer_keys_reads_and_writes_back_unchanged():
    old = {k: v for k, v in SECTION.items() if k not in ("version", "data_lanes", "threshold")}
    p = Provenance.from_dict(old, "config.json")
    assert p.version is None and p.data_lanes is None and not p.records("data_lanes") and p.threshold is None
    assert json.dumps(p.to_dict()) == json.dumps(old)


def test_keys_of_a_later_version_are_kept():
    newer = SECTION | {"version": 2, "tracker_run": "wandb/abc"}
    p = Provenance.from_dict(newer, "config.json")
    assert p.other == {"tracker_run": "wandb/abc"} and p.to_dict() == newer


@pytest.mark.parametrize("key, value, expected", [
    ("sink_multiple", "ten", "workbench.sink_multiple is 'ten', not a number"),
    ("sink_multiple", True, "workbench.sink_multiple is True, not a number"),
    ("layer", 2.5, "workbench.layer is 2.5, not an integer"),
    ("drop_first_token", 1, "workbench.drop_first_token is 1, not true or false"),
    ("threshold", [1], "workbench.threshold is [1], not an object"),
    ("version", "1", "workbench.version is '1', not an integer"),
])
def test_a_wrong_type_is_one_line_naming_the_file_and_key(key, value, expected):
    with pytest.raises(WorkbenchError) as err:
        Provenance.from_dict(SECTION | {key: value}, "/x/config.json")
    message = str(err.value)
    assert message.startswith("/x/config.json: ") and expected in message and "\n" not in message


def test_not_an_object_and_empty():
    with pytest.raises(WorkbenchError, match="workbench is a JSON list, not an object"):
        Provenance.from_dict([1], "config.json")
    assert Provenance.from_dict({}, "config.json") is None and Provenance.from_dict(None, "config.json") is None


def test_recorded_filter_tells_a_recorded_null_from_an_absent_key():
    recipe = CollectConfig(sink_multiple=7.0, drop_first_token=False, sink_median="all")
    off = Provenance.from_dict({"sink_multiple": None, "drop_first_token": True}, "c")
    assert recorded_filter(off, recipe) == {"sink_multiple": None, "drop_first_token": True, "sink_median": "all",
                                            "filter_source": "sae config"}
    silent = Provenance.from_dict({"drop_first_token": True}, "c")
    assert recorded_filter(silent, recipe) == {"sink_multiple": 7.0, "drop_first_token": True, "sink_median": "all",
                                               "filter_source": "recipe"}
    assert recorded_filter(None, recipe)["sink_multiple"] == 7.0
