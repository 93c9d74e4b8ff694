"""The `workbench` section: what an SAE folder records about how the workbench made it.

It is config.json's `workbench` section in the dictionary_learning format and `metadata.workbench` in
SAELens cfg.json: the model, data and layer, the sink filter the training tokens went through (multiple,
median rule, first-token removal), the normalisation folded into the weights, the training run's size and
fingerprints, and the history of the scalar JumpReLU threshold. Training writes it
(`Provenance.for_training`), `workbench threshold` adds the threshold history, the formats carry it
across conversions, and threshold, eval, export, inference and the model card read it through the typed
fields here, never by string keys.

Versions: 1 is the first versioned schema. Files written before versions carry the same fields and no
`version` key; they read as `version=None` and are written back without one. Keys this version does not
know (a later workbench's) are kept in `other` and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from workbench.errors import WorkbenchError

SCHEMA_VERSION = 1

_KINDS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                           dict: "an object"}


def _check(where: str, key: str, value: Any, kind: type) -> Any:
    """value when it is None or of `kind` (an int is a float; a bool is neither), else one WorkbenchError."""
    if value is None:
        return None
    ok = isinstance(value, bool) if kind is bool else (
        not isinstance(value, bool) and isinstance(value, int | float) if kind is float else
        not isinstance(value, bool) and isinstance(value, kind))
    if not ok:
        raise WorkbenchError(f"{where}: workbench.{key} is {value!r}, not {_KINDS[kind]}; fix it (or delete the key) "
                             "and run again")
    return value


@dataclass
class ThresholdHistory:
    """`workbench.threshold`: the threshold `workbench threshold` wrote, how, and what it replaced."""

    value: float | None = None
    method: str | None = None  # ema, batch-min or l0
    previous: dict | None = None  # {"threshold": float, "method": str}
    ema: float | None = None  # the training estimate, kept once another threshold replaced it
    batch_size: int | None = None
    num_tokens: int | None = None
    split: str | None = None  # the cache split the estimates were measured on: held-out or all
    report: dict | None = None  # per method {"threshold", "l0", "fve"}, and "batch_topk" {"l0", "fve"}

    _TYPES = {"value": float, "method": str, "previous": dict, "ema": float, "batch_size": int, "num_tokens": int,
              "split": str, "report": dict}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ThresholdHistory:
        _check(where, "threshold", data, dict)
        return cls(**{key: _check(where, f"threshold.{key}", data.get(key), kind) for key, kind in cls._TYPES.items()})


@dataclass
class Provenance:
    """The `workbench` section as typed fields (None: not recorded)."""

    arch: str | None = None  # the registry name: batchtopk or matryoshka
    model: str | None = None
    dataset: str | None = None
    layer: int | None = None
    sink_multiple: float | None = None  # the sink filter of the training tokens (None: off)
    sink_median: str | None = None  # "real" or "all": the tokens the batch median is taken over
    drop_first_token: bool | None = None
    normalize_activations: bool | None = None
    norm_factor: float | None = None  # folded into the saved biases; recorded for reference
    k_anneal_steps: int | None = None
    cache: str | None = None  # the activation cache the SAE was trained on
    cache_fingerprint: str | None = None
    holdout_fraction: float | None = None  # the cache's held-out tail that threshold and eval read
    eval_tokens: int | None = None
    tokens_trained: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    data_lanes: int | None = None
    dead_feature_threshold: int | None = None
    autocast_dtype: str | None = None
    init_from: str | None = None
    train_fingerprint: str | None = None  # what makes a finished SAE this train recipe's
    algorithm: str | None = None  # train.algorithm: dictionary_learning or saelens (None: not recorded)
    saelens: dict | None = None  # train.saelens, with the saelens algorithm: SAELens' training settings
    version: int | None = SCHEMA_VERSION  # None: written before the schema had versions
    threshold: ThresholdHistory | None = None  # set by `workbench threshold`
    other: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are
    # The schema keys the section holds. A recorded null differs from an absent key: sink_multiple null
    # means the filter was off, absent means the section does not say. None: every key (a new section).
    recorded: frozenset[str] | None = field(default=None, repr=False, compare=False)

    _TYPES = {"arch": str, "model": str, "dataset": str, "layer": int, "sink_multiple": float, "sink_median": str,
              "drop_first_token": bool, "normalize_activations": bool, "norm_factor": float, "k_anneal_steps": int,
              "cache": str, "cache_fingerprint": str, "holdout_fraction": float, "eval_tokens": int,
              "tokens_trained": int, "steps": int, "batch_size": int, "data_lanes": int,
              "dead_feature_threshold": int, "autocast_dtype": str, "init_from": str, "train_fingerprint": str,
              "algorithm": str, "saelens": dict}

    def records(self, key: str) -> bool:
        """Whether the section holds `key` (null included)."""
        return self.recorded is None or key in self.recorded

    def to_dict(self) -> dict:
        """The JSON section: the recorded keys in schema order, then the version (when the section has
        one), the threshold history (once there is one) and the keys of a later version."""
        out = {key: getattr(self, key) for key in self._TYPES if self.records(key)}
        if self.version is not None:
            out["version"] = self.version
        if self.threshold is not None:
            out["threshold"] = self.threshold.to_dict()
        return out | self.other

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Provenance | None:
        """The section read from `where` (its file, for error messages); None when there is none. A field
        of the wrong JSON type is one WorkbenchError naming it."""
        if data is None or data == {}:
            return None
        if not isinstance(data, dict):
            raise WorkbenchError(f"{where}: workbench is a JSON {type(data).__name__}, not an object; fix it or "
                                 "re-export the SAE")
        known = {key: _check(where, key, data.get(key), kind) for key, kind in cls._TYPES.items()}
        version = _check(where, "version", data.get("version"), int)
        threshold = ThresholdHistory.from_dict(data["threshold"], where) if data.get("threshold") is not None else None
        other = {key: value for key, value in data.items() if key not in cls._TYPES and key not in ("version", "threshold")}
        return cls(**known, version=version, threshold=threshold, other=other,
                   recorded=frozenset(key for key in cls._TYPES if key in data))

    @property
    def threshold_method(self) -> str | None:
        return self.threshold.method if self.threshold is not None else None


def recorded_filter(provenance: Provenance | None, fallback) -> dict:
    """The sink-filter settings an SAE was trained under, as its section records them: sink_multiple,
    drop_first_token and sink_median, each else `fallback`'s (a recipe's collect section, or the
    defaults); and filter_source, "sae config" or "recipe". An SAE with no section (the workbench did
    not train it) gets the fallback's."""
    def pick(key: str) -> Any:
        return getattr(provenance, key) if provenance is not None and provenance.records(key) else getattr(fallback, key)

    source = "sae config" if provenance is not None and provenance.records("sink_multiple") else "recipe"
    return {"sink_multiple": pick("sink_multiple"), "drop_first_token": pick("drop_first_token"),
            "sink_median": pick("sink_median"), "filter_source": source}
