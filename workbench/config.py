"""Recipes: OmegaConf YAML validated against the dataclasses below.

A recipe is plain data. `load_recipe(path, overrides)` reads the YAML (following `base:` to compose
recipes), applies dotlist overrides (`collect.batch_size=8`), checks every key against these
dataclasses (an unknown key names the nearest valid one) and returns a typed `Recipe`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from workbench.errors import WorkbenchError

MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORE_DTYPES = ("model", "bfloat16", "float16", "float32")


@dataclass
class ModelConfig:
    name: str = "embedded:tiny-qwen3"  # hub id, local directory, or embedded:<name> (built locally)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    trust_remote_code: bool = False
    revision: str | None = None
    # The model's shape, for `run --dry-run` without loading anything; checked against the real
    # config when the model is loaded.
    num_layers: int | None = None
    d_model: int | None = None


@dataclass
class DataConfig:
    path: str = "embedded:corpus"  # hub dataset id, .txt (a document a line), .jsonl, a directory, embedded:corpus
    text_key: str = "text"
    split: str = "train"  # hub datasets only
    name: str | None = None  # hub dataset config name
    context_length: int = 128
    num_tokens: int = 100_000  # tokens to read through the model (rows x context_length)
    packing: bool = True  # join documents with EOS into full rows; false: one padded document a row
    # Hub datasets are streamed; local files are read whole.
    streaming: bool = True


@dataclass
class CollectConfig:
    layers: list[Any] = field(default_factory=lambda: [0.5])  # ints, or fractions in (0, 1) of the depth
    batch_size: int = 8  # sequences per forward
    sink_multiple: float | None = 10.0  # drop tokens with norm > multiple x batch median; null: off
    sink_median: str = "real"  # real: median over non-padding tokens; all: every position (reference rule)
    drop_first_token: bool = True  # the BOS token, or the first non-pad token when there is no BOS
    store_dtype: str = "model"  # model | bfloat16 | float16 | float32
    shard_batches: int = 16  # forward batches per shard file: the unit of resume after a crash
    out: str = "checkpoints/cache"
    device: str | None = None  # default: Accelerate's device for this process


@dataclass
class SAEConfig:
    name: str = "trainer_0"
    arch: str = "batchtopk"  # batchtopk | matryoshka
    width: int = 4096
    k: int = 32
    group_fractions: list[float] | None = None  # matryoshka: fractions of width, summing to 1
    group_weights: list[float] | None = None  # matryoshka: loss weight per group (default 1/n_groups)


@dataclass
class TrainConfig:
    cache: str | None = None  # default: collect.out
    layers: list[int] | None = None  # default: every layer in the cache
    saes: list[SAEConfig] = field(default_factory=lambda: [SAEConfig()])
    batch_size: int = 2048  # tokens per step (the global batch across processes)
    num_tokens: int = 1_000_000
    lr: float | None = None  # null: 2e-4 / sqrt(width / 2^14)
    warmup_steps: int = 1000
    decay_start: float | None = 0.8  # fraction of steps (<= 1) or a step index (> 1); null: no decay
    k_anneal_steps: float | None = 0.01  # fraction of steps (<= 1) or a step count (> 1); null/0: off
    threshold_start_step: int = 1000
    threshold_beta: float = 0.999
    auxk_alpha: float = 0.03125
    dead_feature_threshold: int = 10_000_000  # tokens without firing before a latent counts as dead
    normalize_activations: bool = True
    autocast_dtype: str | None = None  # null | bfloat16 | float16
    init_from: str | None = None  # an SAE folder (either format) to fine-tune
    checkpoint_every: int = 1000
    eval_tokens: int = 50_000  # held-out cache tokens for eval_results.json
    data_lanes: int = 8  # the cache is read as this many interleaved streams; processes must divide it
    seed: int = 0
    out: str = "checkpoints/saes"


def train_steps(t: TrainConfig) -> int:
    """Optimiser steps per SAE: num_tokens // batch_size (the tokens of a last partial batch are not read)."""
    return t.num_tokens // t.batch_size


def schedule_step(value: float | None, steps: int) -> int | None:
    """A schedule point of the train section (decay_start, k_anneal_steps) as a step: a fraction of
    `steps` when <= 1, else a step index; int() rounds down. None stays None."""
    if value is None:
        return None
    return int(value * steps) if value <= 1 else int(value)


@dataclass
class ThresholdConfig:
    method: str = "l0"  # ema | batch-min | l0: how the JumpReLU threshold is derived after training
    num_tokens: int = 50_000  # held-out cache tokens used to derive and report it
    batch_size: int | None = None  # batch-min's batch; null: the SAE's training batch (buffer.out_batch_size)


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["dictionary_learning", "saelens"])
    out: str = "checkpoints/export"
    series_name: str | None = None  # dictionary_learning series folder, e.g. saes_Qwen_Qwen3-8B_batch_top_k
    allow_uncalibrated: bool = False  # export an SAE whose threshold was never set (-1)


@dataclass
class EvalConfig:
    num_tokens: int = 20_000  # held-out text tokens run through the model with the SAE spliced in
    batch_size: int = 8  # sequences per forward
    splice_all: bool = False  # also splice sink and first tokens (default: they pass through unreconstructed)
    # Held-out text: null skips the rows collection read (num_rows(data)) in data.path's stream; a split
    # name (hub datasets, e.g. validation) reads that split from its start instead.
    split: str | None = None
    # Published explained variance per layer, the target a reproduction is compared with (printed by
    # `workbench plan`, e.g. {0: 0.991, 24: 0.745} for the Gemma-3-1b series).
    target_explained_variance: dict[int, float] = field(default_factory=dict)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _nearest(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid keys here: {', '.join(prefix + c for c in sorted(choices))})"


def _check_keys(raw: Any, schema: type, prefix: str) -> None:
    """Walk a raw mapping against a dataclass and fail on the first key it does not have."""
    if not isinstance(raw, dict):
        return
    names = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise WorkbenchError(f"unknown recipe key '{dotted}'{_nearest(str(key), list(names), prefix)}")
        sub = _dataclass_of(names[key])
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, dotted + ".")
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(item, sub, f"{dotted}[{i}].")


def _dataclass_of(f: Any) -> type | None:
    """The dataclass a field holds, directly or as list items (SAEConfig for train.saes)."""
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if is_dataclass(default):
        return type(default)
    if isinstance(default, list) and default and is_dataclass(default[0]):
        return type(default[0])
    return None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file, merging it over its `base:` recipe(s), paths relative to the file."""
    if not path.is_file():
        raise WorkbenchError(f"recipe file not found: {path} (pass the path of a YAML recipe, e.g. recipes/demo.yaml)")
    if path.resolve() in seen:
        raise WorkbenchError(f"recipe {path} includes itself through 'base:'; remove the cycle")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, ValueError) as err:
        raise WorkbenchError(f"recipe {path} is not valid YAML: {err}".splitlines()[0]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WorkbenchError(f"recipe {path} must be a mapping of sections (model, data, collect, train)")
    bases = raw.pop("base", None)
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path.resolve())))
    return _deep_merge(merged, raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (or only defaults when path is None) with dotlist overrides applied."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    try:
        dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except (OmegaConfBaseException, ValueError) as err:
        raise WorkbenchError(f"bad override {list(overrides)}: {err}; write them as key=value, e.g. collect.batch_size=8") from None
    for item in overrides:
        if "=" not in item:
            raise WorkbenchError(f"bad override '{item}': write it as key=value, e.g. collect.batch_size=8")
    raw = _deep_merge(raw, dot)
    _check_keys(raw, Recipe, "")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(Recipe), raw)
        recipe = OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise WorkbenchError(f"recipe key '{key}' has a bad value: {msg}") from None
    assert isinstance(recipe, Recipe)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Checks that need more than types: allowed names and ranges."""
    m, d, c, t = recipe.model, recipe.data, recipe.collect, recipe.train
    _choice("model.dtype", m.dtype, MODEL_DTYPES)
    _choice("collect.store_dtype", c.store_dtype, STORE_DTYPES)
    _choice("collect.sink_median", c.sink_median, ("real", "all"))
    _positive("data.context_length", d.context_length)
    _positive("data.num_tokens", d.num_tokens)
    _positive("collect.batch_size", c.batch_size)
    _positive("collect.shard_batches", c.shard_batches)
    if c.sink_multiple is not None and c.sink_multiple <= 0:
        raise WorkbenchError(f"collect.sink_multiple must be > 0 or null (got {c.sink_multiple})")
    if not c.layers:
        raise WorkbenchError("collect.layers is empty: list layer indices or depth fractions, e.g. [0.25, 0.5]")
    for layer in c.layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, float)):
            raise WorkbenchError(f"collect.layers entry {layer!r} is not a layer index or a fraction in (0, 1)")
        if isinstance(layer, float) and not 0 < layer < 1:
            raise WorkbenchError(f"collect.layers entry {layer} is a float outside (0, 1): use an int index or a fraction")
    _positive("train.batch_size", t.batch_size)
    _positive("train.num_tokens", t.num_tokens)
    _positive("train.data_lanes", t.data_lanes)
    _positive("train.checkpoint_every", t.checkpoint_every)
    if t.batch_size % t.data_lanes:
        raise WorkbenchError(f"train.batch_size ({t.batch_size}) must be a multiple of train.data_lanes ({t.data_lanes})")
    if t.eval_tokens < 0 or t.warmup_steps < 0 or t.dead_feature_threshold <= 0:
        raise WorkbenchError("train.eval_tokens and train.warmup_steps must be >= 0, train.dead_feature_threshold > 0")
    if not 0 <= t.threshold_beta < 1:
        raise WorkbenchError(f"train.threshold_beta must be in [0, 1) (got {t.threshold_beta})")
    if t.autocast_dtype is not None:
        _choice("train.autocast_dtype", t.autocast_dtype, ("bfloat16", "float16"))
    names = [s.name for s in t.saes]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"train.saes names must be unique (got {names})")
    for i, sae in enumerate(t.saes):
        where = f"train.saes[{i}] ({sae.name})"
        _choice(f"{where}.arch", sae.arch, ("batchtopk", "matryoshka"))
        _positive(f"{where}.width", sae.width)
        _positive(f"{where}.k", sae.k)
        if sae.arch == "matryoshka":
            if not sae.group_fractions:
                raise WorkbenchError(f"{where}.group_fractions is required for arch matryoshka, e.g. [0.25, 0.75]")
            if abs(sum(sae.group_fractions) - 1.0) > 1e-6:
                raise WorkbenchError(f"{where}.group_fractions must sum to 1 (got {sum(sae.group_fractions)})")
            if sae.group_weights is not None and len(sae.group_weights) != len(sae.group_fractions):
                raise WorkbenchError(f"{where}.group_weights needs one weight per group ({len(sae.group_fractions)})")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise WorkbenchError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _positive(key: str, value: Any) -> None:
    if value <= 0:
        raise WorkbenchError(f"{key} must be > 0 (got {value})")


def to_dict(obj: Any) -> dict:
    """A dataclass section as plain data (for manifests and config.json extras)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def fingerprint(data: dict) -> str:
    """A short stable hash of plain data: identifies the recipe that made a cache."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "CollectConfig",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "ThresholdConfig",
    "ModelConfig",
    "Recipe",
    "SAEConfig",
    "TrainConfig",
    "fingerprint",
    "load_recipe",
    "schedule_step",
    "to_dict",
    "train_steps",
]
