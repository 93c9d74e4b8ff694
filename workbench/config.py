"""Recipes: OmegaConf YAML validated against the dataclasses below.

A recipe is plain data. `load_recipe(path, overrides)` reads the YAML (following `base:` to compose
recipes), applies dotlist overrides (`collect.batch_size=8`, `train.saes[0].k=32`), checks every key
against these dataclasses (an unknown key names the nearest valid one) and every value against its
type and range, and returns a typed `Recipe`. Every mistake is one WorkbenchError naming the file or
the override it is in.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

from workbench.errors import WorkbenchError

MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORE_DTYPES = ("model", "bfloat16", "float16", "float32")
THRESHOLD_METHODS = ("ema", "batch-min", "l0")  # as workbench.threshold.METHODS
EXPORT_FORMATS = ("dictionary_learning", "saelens")  # as workbench.export.TARGETS
# Names that become one folder: an SAE's under its layer (no dot, so no clash with the layer's checkpoint.pt),
# the export's series under <export.out>/<format>/.
SAE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SERIES_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


DEFAULT_SINK_MULTIPLE = 10.0  # collect.sink_multiple's default, the reference rule's (dictionary_learning PR #52)


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
    sink_multiple: float | None = DEFAULT_SINK_MULTIPLE  # drop tokens with norm > multiple x batch median; null: off
    sink_median: str = "real"  # real: median over non-padding tokens; all: every position (reference rule)
    drop_first_token: bool = True  # the BOS token, or the first non-pad token when there is no BOS
    store_dtype: str = "model"  # model | bfloat16 | float16 | float32
    shard_batches: int = 16  # forward batches per shard file: the unit of resume after a crash
    # The cache as a bounded buffer (workbench/cache/buffer.py): null keeps every shard; N makes collection
    # wait while N shards that training has not released are on disk, and training deletes what it consumed.
    max_shards_on_disk: int | None = None
    holdout_shards: int = 1  # with max_shards_on_disk: the first shards, held out from training and kept
    out: str = "checkpoints/cache"
    device: str | None = None  # default: Accelerate's device for this process


@dataclass
class SAEConfig:
    name: str = "trainer_0"  # its folder under resid_post_layer_<L>/: letters, digits, '_' and '-'; unique
    arch: str = "batchtopk"  # batchtopk | matryoshka: a name in workbench.sae.registry.ARCHITECTURES
    width: int = 4096
    k: int = 32  # latents a token on average (batch top-k), at most width
    group_fractions: list[float] | None = None  # matryoshka: fractions of width, each > 0, summing to 1
    group_weights: list[float] | None = None  # matryoshka: loss weight per group, >= 0 (default 1/n_groups)
    algorithm: str | None = None  # dictionary_learning | saelens: this SAE's training algorithm; null: train.algorithm


TRAIN_ALGORITHMS = ("dictionary_learning", "saelens")  # train.algorithm: whose training step trains the SAEs
SAELENS_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")  # SAELens' lr_scheduler_name
SAELENS_NORMALIZATIONS = ("none", "expected_average_only_in")  # the SAELens normalize_activations the workbench trains


@dataclass
class SAELensTrainConfig:
    """train.saelens: how SAELens 6.54.12's SAETrainer trains BatchTopK and Matryoshka BatchTopK SAEs, read
    when train.algorithm is saelens. SAELens' own names and defaults (LanguageModelSAERunnerConfig,
    TopKTrainingSAEConfig, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAEConfig)."""

    lr: float = 3e-4
    lr_scheduler_name: str = "constant"  # constant | cosineannealing | cosineannealingwarmrestarts
    lr_warm_up_steps: int = 0  # linear warmup
    lr_decay_steps: int = 0  # linear decay to 0 over the last steps
    lr_end: float | None = None  # null: lr / 10 (the cosine schedules' floor; where the decay starts)
    n_restart_cycles: int = 1  # cosineannealingwarmrestarts only
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    dead_feature_window: int = 1000  # steps without firing after which a latent is dead (counted in steps)
    aux_loss_coefficient: float = 1.0
    topk_threshold_lr: float = 0.01  # rate of the threshold's EMA (from step 0, float64)
    rescale_acts_by_decoder_norm: bool = True  # batch top-k on pre-activations x decoder row norms
    decoder_init_norm: float | None = 0.1  # decoder rows' norm at initialisation; null: kaiming rows as drawn
    use_matryoshka_aux_loss: bool = False  # Matryoshka: dead latents reconstruct their own level's residual
    normalize_activations: str = "none"  # none | expected_average_only_in (x * sqrt(d_in) / mean ||x||)
    n_batches_for_norm_estimate: int = 1000  # training batches averaged for expected_average_only_in
    # The workbench's, not SAELens': true, SAELens' own dense products, the same weights as sae-lens bit for bit;
    # false, the same math with sparse products over the kept entries (faster; the weights agree to float rounding
    # until a near-tie at a top-k cut goes the other way, after which the runs part as two seeds would)
    exact: bool = True


@dataclass
class TrainConfig:
    algorithm: str = "dictionary_learning"  # dictionary_learning | saelens (then train.saelens applies)
    saelens: SAELensTrainConfig = field(default_factory=SAELensTrainConfig)
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
    shuffle_shards: int = 8  # a bounded cache (collect.max_shards_on_disk) is shuffled within windows of this many shards
    seed: int = 0
    out: str = "checkpoints/saes"


def sae_algorithm(t: TrainConfig, sae: SAEConfig) -> str:
    """The algorithm that trains one SAE: its own train.saes[i].algorithm, else train.algorithm."""
    return sae.algorithm or t.algorithm


def train_identity(t: TrainConfig) -> dict:
    """The train section as plain data, for fingerprints, without what changes no result, so that SAEs and
    checkpoints from before train.algorithm (and train.saes[i].algorithm) existed stay valid: an SAE's
    algorithm where it is the recipe's, and the algorithm keys where every SAE trains with the default."""
    data = to_dict(t)
    for sae, entry in zip(t.saes, data["saes"], strict=True):
        if sae_algorithm(t, sae) == t.algorithm:
            del entry["algorithm"]
    if t.algorithm == TRAIN_ALGORITHMS[0] and all(sae_algorithm(t, sae) == t.algorithm for sae in t.saes):
        del data["algorithm"], data["saelens"]
    elif t.saelens.exact:  # the default, from before the key existed
        del data["saelens"]["exact"]
    return data


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


TRACKERS = ("tensorboard", "wandb")


@dataclass
class TrackingConfig:
    """Experiment trackers through Accelerate's tracking API, on the main process only. Not part of any
    fingerprint: turning a tracker on or off changes no cache and no SAE."""

    log_with: list[str] = field(default_factory=list)  # tensorboard | wandb; empty: off
    project: str = "sae-workbench"  # the wandb project; TensorBoard's folder under `dir`
    run: str | None = None  # null: the name of the folder holding train.out (checkpoints/demo/saes -> demo)
    dir: str | None = None  # TensorBoard event files and wandb's run folders; null: <train.out>/trackers


@dataclass
class FeaturesConfig:
    """`workbench features` in the pipeline: each SAE's max-activating examples and feature pages."""

    out: str | None = None  # null: the pipeline makes no feature pages; else <out>/<layer folder>/<name>/index.html
    top: int = 20  # examples per latent
    window: int = 8  # context tokens either side of an example
    effects: bool = True  # add each latent's output-token effects (loads the recipe's model)


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
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (or only defaults when path is None) with dotlist overrides applied.

    The file (after its `base:` recipes) and then each override are merged in turn into the defaults,
    each checked as it is merged, so an error names the file or the override it comes from.
    """
    conf = OmegaConf.structured(Recipe)
    if path is not None:
        _merge_file(conf, Path(path), ())
    for item in overrides:
        _merge(conf, _override(conf, item), f"override '{item}': ")
    try:
        recipe = OmegaConf.to_object(conf)  # resolves ${...} interpolations
    except OmegaConfBaseException as err:
        raise WorkbenchError(_bad_value(err)) from None
    assert isinstance(recipe, Recipe)
    validate(recipe)
    return recipe


# --- Files and overrides -------------------------------------------------------------------------------

def _merge_file(conf: DictConfig, path: Path, seen: tuple[Path, ...]) -> None:
    """Merge a recipe file into conf: its `base:` recipes first (paths relative to the file), then itself."""
    if path.resolve() in seen:
        raise WorkbenchError(f"recipe {path} includes itself through 'base:'; remove the cycle")
    raw = _read_file(path)
    bases = raw.pop("base", None)
    names = [bases] if isinstance(bases, str) else bases if bases is not None else []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise WorkbenchError(f"recipe {path}: base must name a recipe file relative to it, or a list of them, "
                             f"e.g. base: base/qwen3-batchtopk.yaml (got {bases!r})")
    for name in names:
        base = path.parent / name
        if not base.is_file():
            state = "is a directory" if base.is_dir() else "does not exist"
            raise WorkbenchError(f"recipe {path}: its base '{name}' ({base}) {state}; base names a recipe file, "
                                 f"relative to {path.parent}")
        _merge_file(conf, base, (*seen, path.resolve()))
    _merge(conf, raw, f"recipe {path}: ")


def _read_file(path: Path) -> dict:
    """A recipe file's top-level mapping ({} for an empty file)."""
    if path.is_dir():
        raise WorkbenchError(f"recipe {path} is a directory: pass a YAML recipe file, e.g. recipes/demo.yaml")
    if not path.is_file():
        raise WorkbenchError(f"recipe file not found: {path} (pass the path of a YAML recipe, e.g. recipes/demo.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkbenchError(f"recipe {path} is not UTF-8 text: pass a YAML recipe file") from None
    except OSError as err:
        raise WorkbenchError(f"cannot read recipe {path}: {err.strerror}; check that it is readable") from None
    try:
        # OmegaConf.load's own YAML rules (1e-3 is a float, a duplicate key is an error), on the text
        # already read, so that the parser's line and column can be reported.
        raw = yaml.load(text, Loader=get_yaml_loader())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "not valid YAML"
        if "\\t" in problem:
            fix = "indent with spaces, not tabs"
        elif "duplicate key" in problem:
            fix = "keep one of the two"
        else:
            fix = "fix the YAML there (a bracket or quote left open, a missing ':' or a wrong indent?)"
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = err.context_mark
        if err.problem and err.context and context is not None and "duplicate key" not in problem:
            problem += f" ({err.context} at line {context.line + 1}, column {context.column + 1})"
        raise WorkbenchError(f"recipe {path}{at}: {problem}; {fix}") from None
    except yaml.YAMLError as err:
        raise WorkbenchError(f"recipe {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WorkbenchError(f"recipe {path} holds a YAML {_kind(raw)}, not a mapping of sections: write `section:` "
                             f"lines with indented `key: value` lines under them (sections: "
                             f"{', '.join(f.name for f in fields(Recipe))})")
    return raw


_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*|[0-9]+)((?:\[[0-9]+\])*)")


def _key_parts(key: str) -> list[str | int] | None:
    """`train.saes[0].k` -> ['train', 'saes', 0, 'k']; None when it is not a dotted key."""
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            return None
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"[0-9]+", match.group(2))]
    return parts


def _override(conf: DictConfig, item: str) -> dict:
    """A dotlist override `key=value` as a mapping to merge into conf.

    The key is dotted and indexes lists with [i] (or .i). Merging replaces lists whole, so an indexed
    override becomes the whole list with that entry changed (a mapping merged into it).
    """
    key, sep, text = item.partition("=")
    parts = _key_parts(key.strip()) if sep else None
    if not parts:
        raise WorkbenchError(f"bad override '{item}': write it as key=value, with dotted keys and lists indexed "
                             "from [0], e.g. collect.batch_size=8 or train.saes[0].k=32")
    where = f"override '{item}': "
    try:
        value = yaml.load(text, Loader=get_yaml_loader())
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise WorkbenchError(f"{where}the value is not valid YAML ({problem}); e.g. collect.layers=[9,18] or "
                             "train.saes[0].k=32") from None
    return _patch(OmegaConf.to_container(conf, resolve=False), Recipe, parts, value, "", where)


def _patch(node: Any, hint: Any, parts: list[str | int], value: Any, dotted: str, where: str) -> Any:
    """The value to merge at `dotted` (whose current value is node, of type hint) for the key parts left."""
    if not parts:
        return value
    part, rest = parts[0], parts[1:]
    hint, _ = _unwrap(hint)
    origin = typing.get_origin(hint)
    if is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        if isinstance(part, int):
            raise WorkbenchError(f"{where}recipe key '{dotted}' is a section, not a list: it has no [{part}]")
        if part not in hints:
            prefix = f"{dotted}." if dotted else ""
            raise WorkbenchError(f"{where}unknown recipe key '{prefix}{part}'{_nearest(part, list(hints), prefix)}")
        name = f"{dotted}.{part}" if dotted else part
        child = node.get(part) if isinstance(node, dict) else None
        return {part: _patch(child, hints[part], rest, value, name, where)}
    if origin is list:
        index = _integer(part)
        if index is None:
            raise WorkbenchError(f"{where}recipe key '{dotted}' is a list: index it from 0, e.g. {dotted}[0]")
        if not isinstance(node, list):
            raise WorkbenchError(f"{where}recipe key '{dotted}' is null, not a list: set the whole list, "
                                 f"e.g. {dotted}=[...]")
        if index >= len(node):
            have = f"entries 0..{len(node) - 1}" if node else "no entries"
            raise WorkbenchError(f"{where}{dotted}[{index}] is out of range: {dotted} has {have}; to add one, "
                                 f"set the whole list, e.g. {dotted}=[...]")
        (item_hint,) = typing.get_args(hint)
        entry = _patch(node[index], item_hint, rest, value, f"{dotted}[{index}]", where)
        if isinstance(entry, dict) and isinstance(node[index], dict):
            entry = {**node[index], **entry}
        return [*node[:index], entry, *node[index + 1:]]
    if origin is dict and not rest:
        key_type, _ = typing.get_args(hint)
        key = _integer(part) if key_type is int else part
        if key is None:
            raise WorkbenchError(f"{where}recipe key '{dotted}' takes integer keys, e.g. {dotted}.12=...")
        return {key: value}
    raise WorkbenchError(f"{where}recipe key '{dotted}' is a value, not a section: it has no key '{part}'")


def _integer(part: str | int) -> int | None:
    if isinstance(part, int):
        return part
    return int(part) if part.isascii() and part.isdigit() else None


# --- Checking keys and shapes -------------------------------------------------------------------------

def _merge(conf: DictConfig, raw: dict, where: str) -> None:
    """Merge plain data into conf after checking its keys and shapes; OmegaConf converts and checks scalars."""
    checked = _check_section(raw, Recipe, "", where)
    try:
        conf.merge_with(checked)
    except OmegaConfBaseException as err:
        raise WorkbenchError(where + _bad_value(err)) from None


def _check_section(raw: dict, schema: type, prefix: str, where: str) -> dict:
    """raw's keys against a dataclass's fields (an unknown one names the nearest), each value's shape
    against its field; a section left null (every key commented out) sets nothing and is dropped."""
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise WorkbenchError(f"{where}unknown recipe key '{dotted}'{_nearest(str(key), list(hints), prefix)}")
        if value is None and is_dataclass(_unwrap(hints[key])[0]):
            continue
        out[key] = _check_value(value, hints[key], dotted, where)
    return out


def _check_value(value: Any, hint: Any, dotted: str, where: str) -> Any:
    """Sections must be mappings, lists lists, flags true or false: OmegaConf would turn 'no', 0 or 2
    into a flag, and name no key for a section given a scalar."""
    hint, _ = _unwrap(hint)
    if value is None or (isinstance(value, str) and "${" in value):  # null, or an interpolation resolved later
        return value
    origin = typing.get_origin(hint)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            keys = ", ".join(f"{dotted}.{f.name}" for f in fields(hint)[:3])
            raise WorkbenchError(f"{where}recipe key '{dotted}' is a section: give it a mapping of its keys "
                                 f"({keys}, ...), not {value!r}")
        return _check_section(value, hint, dotted + ".", where)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise WorkbenchError(f"{where}recipe key '{dotted}' takes a list, e.g. {_list_example(item_hint)} "
                                 f"(got {value!r})")
        return [_check_value(v, item_hint, f"{dotted}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict and not isinstance(value, dict):
        raise WorkbenchError(f"{where}recipe key '{dotted}' takes a mapping, e.g. {{0: 0.99, 12: 0.98}} (got {value!r})")
    if hint is bool and not isinstance(value, bool):
        raise WorkbenchError(f"{where}recipe key '{dotted}' takes true or false (got {value!r})")
    return value


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of a field type such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, False


def _list_example(item_hint: Any) -> str:
    if is_dataclass(item_hint):
        return "[{" + ", ".join(f"{f.name}: {f.default}" for f in fields(item_hint) if f.default is not None) + "}]"
    return "[1, 2]" if item_hint in (int, Any) else "[0.25, 0.75]" if item_hint is float else "[a, b]"


def _bad_value(err: OmegaConfBaseException) -> str:
    """OmegaConf's conversion error as one line, with the type the key takes."""
    key = getattr(err, "full_key", None) or "?"
    message = f"recipe key '{key}' has a bad value: {str(err).splitlines()[0]}"
    takes = _takes(key)
    return f"{message}; it takes {takes}" if takes else message


def _takes(key: str) -> str | None:
    """What the field at a dotted key holds, in words ('an integer', 'a number or null'), or None."""
    hint: Any = Recipe
    for part in _key_parts(key) or []:
        hint, _ = _unwrap(hint)
        if is_dataclass(hint) and isinstance(part, str):
            hint = typing.get_type_hints(hint).get(part)
        elif typing.get_origin(hint) in (list, dict):
            hint = typing.get_args(hint)[-1]
        else:
            return None
        if hint is None:
            return None
    hint, optional = _unwrap(hint)
    words = {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(hint)
    if words is None:
        words = "a list" if typing.get_origin(hint) is list else "a mapping" if typing.get_origin(hint) is dict else None
    return None if words is None else words + (" or null" if optional else "")


def _kind(value: Any) -> str:
    return "list" if isinstance(value, list) else f"scalar ({value!r})"


def _nearest(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid keys here: {', '.join(prefix + c for c in sorted(choices))})"


# --- Values: names and ranges -------------------------------------------------------------------------

def validate(recipe: Recipe) -> None:
    """Checks that need more than types: allowed names and ranges, so that every command refuses a recipe
    that training, evaluation or export would crash on (or silently misread) before doing anything."""
    m, d, c, t = recipe.model, recipe.data, recipe.collect, recipe.train
    _choice("model.dtype", m.dtype, MODEL_DTYPES)
    for key, value in (("model.num_layers", m.num_layers), ("model.d_model", m.d_model)):
        if value is not None:
            _positive(key, value)
    _choice("collect.store_dtype", c.store_dtype, STORE_DTYPES)
    _choice("collect.sink_median", c.sink_median, ("real", "all"))
    _positive("data.context_length", d.context_length)
    _positive("data.num_tokens", d.num_tokens)
    _positive("collect.batch_size", c.batch_size)
    _positive("collect.shard_batches", c.shard_batches)
    _validate_buffer(c, t)
    if c.sink_multiple is not None and not c.sink_multiple > 0:
        raise WorkbenchError(f"collect.sink_multiple must be > 0 or null (got {c.sink_multiple})")
    if not c.layers:
        raise WorkbenchError("collect.layers is empty: list layer indices or depth fractions, e.g. [0.25, 0.5]")
    for layer in c.layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, float)):
            raise WorkbenchError(f"collect.layers entry {layer!r} is not a layer index or a fraction in (0, 1)")
        if isinstance(layer, float) and not 0 < layer < 1:
            raise WorkbenchError(f"collect.layers entry {layer} is a float outside (0, 1): use an int index or a fraction")
    _validate_train(t)
    th = recipe.threshold
    _choice("threshold.method", th.method, THRESHOLD_METHODS)
    _positive("threshold.num_tokens", th.num_tokens)
    if th.batch_size is not None:
        _positive("threshold.batch_size", th.batch_size)
    ex = recipe.export
    for fmt in ex.formats:
        _choice("export.formats entry", fmt, EXPORT_FORMATS)
    if len(set(ex.formats)) != len(ex.formats):
        raise WorkbenchError(f"export.formats lists a format twice (got {ex.formats}); list each once")
    if ex.series_name is not None and not SERIES_NAME.fullmatch(ex.series_name):
        raise WorkbenchError(f"export.series_name {ex.series_name!r} must be one folder name: letters, digits, '.', "
                             "'_' and '-', starting with a letter or digit; or null for the default")
    _positive("eval.num_tokens", recipe.eval.num_tokens)
    _positive("eval.batch_size", recipe.eval.batch_size)
    tr = recipe.tracking
    for name in tr.log_with:
        _choice("tracking.log_with entry", name, TRACKERS)
    if len(set(tr.log_with)) != len(tr.log_with):
        raise WorkbenchError(f"tracking.log_with lists a tracker twice (got {tr.log_with}); list each once")
    if tr.run is not None and not SERIES_NAME.fullmatch(tr.run):
        raise WorkbenchError(f"tracking.run {tr.run!r} must be one folder name: letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit; or null for the default")
    _positive("features.top", recipe.features.top)
    if type(recipe.features.window) is not int or recipe.features.window < 0:
        raise WorkbenchError(f"features.window must be an integer >= 0 (got {recipe.features.window!r})")


def _validate_buffer(c: CollectConfig, t: TrainConfig) -> None:
    """The bounded buffer's keys: training holds one window of train.shuffle_shards shards while the next is
    written, and the layers it trains in step drift apart by part of a window, so the buffer holds two."""
    _positive("train.shuffle_shards", t.shuffle_shards)
    if c.max_shards_on_disk is None:
        return
    _positive("collect.max_shards_on_disk", c.max_shards_on_disk)
    _positive("collect.holdout_shards", c.holdout_shards)
    if c.max_shards_on_disk < 2 * t.shuffle_shards:
        raise WorkbenchError(f"collect.max_shards_on_disk ({c.max_shards_on_disk}) is smaller than twice train.shuffle_shards "
                             f"({t.shuffle_shards}): training holds one shuffle window of shards while the next is "
                             f"written; set collect.max_shards_on_disk={2 * t.shuffle_shards} or more, or lower "
                             "train.shuffle_shards")


def _validate_train(t: TrainConfig) -> None:
    _positive("train.batch_size", t.batch_size)
    _positive("train.num_tokens", t.num_tokens)
    _positive("train.data_lanes", t.data_lanes)
    _positive("train.checkpoint_every", t.checkpoint_every)
    if t.batch_size % t.data_lanes:
        raise WorkbenchError(f"train.batch_size ({t.batch_size}) must be a multiple of train.data_lanes ({t.data_lanes})")
    if t.eval_tokens < 0 or t.warmup_steps < 0 or t.dead_feature_threshold <= 0:
        raise WorkbenchError("train.eval_tokens and train.warmup_steps must be >= 0, train.dead_feature_threshold > 0")
    if t.threshold_start_step < 0 or not t.auxk_alpha >= 0:
        raise WorkbenchError(f"train.threshold_start_step and train.auxk_alpha must be >= 0 "
                             f"(got {t.threshold_start_step}, {t.auxk_alpha})")
    if not 0 <= t.threshold_beta < 1:
        raise WorkbenchError(f"train.threshold_beta must be in [0, 1) (got {t.threshold_beta})")
    if t.lr is not None and not (t.lr > 0 and math.isfinite(t.lr)):
        raise WorkbenchError(f"train.lr must be > 0, or null for 2e-4 / sqrt(width / 2^14) (got {t.lr})")
    if t.decay_start is not None and not t.decay_start > 0:
        raise WorkbenchError(f"train.decay_start must be > 0 (a fraction of the steps <= 1, or a step), or null for "
                             f"no decay (got {t.decay_start})")
    if t.k_anneal_steps is not None and not t.k_anneal_steps >= 0:
        raise WorkbenchError(f"train.k_anneal_steps must be >= 0 (a fraction of the steps <= 1, or a step count), or "
                             f"null for no annealing (got {t.k_anneal_steps})")
    if t.autocast_dtype is not None:
        _choice("train.autocast_dtype", t.autocast_dtype, ("bfloat16", "float16"))
    if t.layers is not None:
        if not t.layers:
            raise WorkbenchError("train.layers is empty: list layer indices, or null for every cached layer")
        for layer in t.layers:
            if layer < 0:
                raise WorkbenchError(f"train.layers entry {layer} is negative: give the layer's index in the cache "
                                     "(e.g. 35, not -1)")
    if not t.saes:
        raise WorkbenchError(f"train.saes is empty: list the SAEs to train, e.g. {_list_example(SAEConfig)}")
    names = [s.name for s in t.saes]
    for i, name in enumerate(names):
        if not SAE_NAME.fullmatch(name):
            raise WorkbenchError(f"train.saes[{i}].name {name!r} must be one folder name: letters, digits, '_' and '-', "
                                 "starting with a letter or digit (e.g. trainer_0)")
    folded = [name.casefold() for name in names]
    if len(set(folded)) != len(folded):
        raise WorkbenchError(f"train.saes names must be unique, ignoring case (got {names}): each is a folder")
    for i, sae in enumerate(t.saes):
        _validate_sae(sae, f"train.saes[{i}] ({sae.name})")
    _choice("train.algorithm", t.algorithm, TRAIN_ALGORITHMS)
    for i, sae in enumerate(t.saes):
        if sae.algorithm is not None:
            _choice(f"train.saes[{i}] ({sae.name}).algorithm", sae.algorithm, TRAIN_ALGORITHMS)
    _validate_algorithm_keys(t)


# dictionary_learning's train keys and what SAELens calls them (train.saelens.<key>), or None where it has none.
_DL_ONLY_KEYS = {"lr": "lr", "warmup_steps": "lr_warm_up_steps", "decay_start": "lr_decay_steps",
                 "k_anneal_steps": None, "threshold_start_step": None, "threshold_beta": "topk_threshold_lr",
                 "auxk_alpha": "aux_loss_coefficient", "dead_feature_threshold": "dead_feature_window"}
def _validate_algorithm_keys(t: TrainConfig) -> None:
    """Each algorithm's keys apply to the SAEs it trains (train.saes[i].algorithm, else train.algorithm); those of
    an algorithm no SAE trains with must be left at their defaults (they would be silently unused). The input
    normalisation is the layer's, train.algorithm's, whichever algorithm trains each SAE."""
    used = {sae_algorithm(t, sae) for sae in t.saes}
    defaults = TrainConfig()
    if "dictionary_learning" not in used:
        for key, theirs in _DL_ONLY_KEYS.items():
            if getattr(t, key) != getattr(defaults, key):
                instead = f"set train.saelens.{theirs}" if theirs else "SAELens has no such setting"
                raise WorkbenchError(f"train.{key} is dictionary_learning's setting, unused when every SAE trains with "
                                     f"SAELens' algorithm: remove it ({instead})")
    if "saelens" not in used:
        changed = [f.name for f in fields(SAELensTrainConfig) if getattr(t.saelens, f.name) != getattr(defaults.saelens, f.name)]
        if changed:
            raise WorkbenchError(f"train.saelens.{changed[0]} is set but no SAE trains with SAELens' algorithm: remove it, "
                                 "or set train.algorithm (or a train.saes[i].algorithm) to saelens")
    # every SAE of a layer reads the same scaled batches: the other algorithm's normalisation keys are unused
    if t.algorithm == "saelens" and t.normalize_activations != defaults.normalize_activations:
        raise WorkbenchError("train.normalize_activations is dictionary_learning's setting, unused with train.algorithm "
                             "saelens (a layer's input normalisation is train.algorithm's, for each of its SAEs): remove it "
                             "(set train.saelens.normalize_activations)")
    if t.algorithm == "dictionary_learning":
        for key in ("normalize_activations", "n_batches_for_norm_estimate"):
            if getattr(t.saelens, key) != getattr(defaults.saelens, key):
                raise WorkbenchError(f"train.saelens.{key} is unused with train.algorithm dictionary_learning: a layer's "
                                     "input normalisation is train.algorithm's, for each of its SAEs (here "
                                     "train.normalize_activations); remove it")
    if "saelens" in used:
        _validate_saelens(t)


def _validate_saelens(t: TrainConfig) -> None:
    """train.saelens within SAELens' ranges; no group weights on an SAE SAELens' algorithm trains."""
    for i, sae in enumerate(t.saes):
        if sae_algorithm(t, sae) == "saelens" and sae.group_weights is not None:
            raise WorkbenchError(f"train.saes[{i}] ({sae.name}).group_weights: SAELens adds its Matryoshka levels' losses "
                                 "unweighted; remove group_weights or train it with dictionary_learning's algorithm")
    s = t.saelens
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise WorkbenchError(f"train.saelens.lr must be > 0 (got {s.lr})")
    _choice("train.saelens.lr_scheduler_name", s.lr_scheduler_name, SAELENS_SCHEDULERS)
    _choice("train.saelens.normalize_activations", s.normalize_activations, SAELENS_NORMALIZATIONS)
    if s.lr_warm_up_steps < 0 or s.lr_decay_steps < 0:
        raise WorkbenchError(f"train.saelens.lr_warm_up_steps and lr_decay_steps must be >= 0 "
                             f"(got {s.lr_warm_up_steps}, {s.lr_decay_steps})")
    lr_end = s.lr / 10 if s.lr_end is None else s.lr_end
    if not lr_end >= 0 or (s.lr_decay_steps > 0 and s.lr_scheduler_name != "constant" and lr_end == 0):
        raise WorkbenchError(f"train.saelens.lr_end must be >= 0, and > 0 with lr_decay_steps (got {s.lr_end})")
    for key in ("n_restart_cycles", "dead_feature_window", "n_batches_for_norm_estimate"):
        _positive(f"train.saelens.{key}", getattr(s, key))
    if not (0 <= s.adam_beta1 < 1 and 0 <= s.adam_beta2 < 1):
        raise WorkbenchError(f"train.saelens.adam_beta1 and adam_beta2 must be in [0, 1) (got {s.adam_beta1}, {s.adam_beta2})")
    if not s.aux_loss_coefficient >= 0:
        raise WorkbenchError(f"train.saelens.aux_loss_coefficient must be >= 0 (got {s.aux_loss_coefficient})")
    if not 0 < s.topk_threshold_lr <= 1:
        raise WorkbenchError(f"train.saelens.topk_threshold_lr must be in (0, 1] (got {s.topk_threshold_lr})")
    if s.decoder_init_norm is not None and not s.decoder_init_norm > 0:
        raise WorkbenchError(f"train.saelens.decoder_init_norm must be > 0, or null (got {s.decoder_init_norm})")


def _validate_sae(sae: SAEConfig, where: str) -> None:
    from workbench.sae.registry import ARCHITECTURES

    _choice(f"{where}.arch", sae.arch, tuple(ARCHITECTURES))
    _positive(f"{where}.width", sae.width)
    _positive(f"{where}.k", sae.k)
    if sae.k > sae.width:
        raise WorkbenchError(f"{where}.k ({sae.k}) is larger than its width ({sae.width}): batch top-k keeps k of "
                             "the width latents a token; lower k or raise the width")
    arch = ARCHITECTURES[sae.arch]
    if "group_fractions" not in arch.recipe_keys:
        if sae.group_fractions is not None or sae.group_weights is not None:
            grouped = ", ".join(a.name for a in ARCHITECTURES.values() if "group_fractions" in a.recipe_keys)
            raise WorkbenchError(f"{where}.group_fractions and group_weights are for arch {grouped} only; remove "
                                 f"them or set arch: {grouped}")
        return
    fractions = sae.group_fractions
    if not fractions:
        raise WorkbenchError(f"{where}.group_fractions is required for arch {sae.arch}, e.g. [0.25, 0.75]")
    if not all(f > 0 for f in fractions):
        raise WorkbenchError(f"{where}.group_fractions entries must be > 0 (got {fractions})")
    if not math.isclose(sum(fractions), 1.0):  # dictionary_learning's own check
        raise WorkbenchError(f"{where}.group_fractions must sum to 1 (got {fractions}, sum {sum(fractions)!r})")
    sizes = arch.group_sizes(sae.width, fractions)
    if min(sizes) < 1:
        raise WorkbenchError(f"{where}.group_fractions {fractions} give group sizes {sizes} at width {sae.width}: "
                             "every group needs at least one latent; raise the small fractions or the width")
    weights = sae.group_weights
    if weights is not None:
        if len(weights) != len(fractions):
            raise WorkbenchError(f"{where}.group_weights needs one weight per group ({len(fractions)}), "
                                 f"got {len(weights)}; or null for 1/{len(fractions)} each")
        if not all(w >= 0 and math.isfinite(w) for w in weights) or not sum(weights) > 0:
            raise WorkbenchError(f"{where}.group_weights must be >= 0 and not all 0 (got {weights})")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise WorkbenchError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _positive(key: str, value: Any) -> None:
    if not value > 0:
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
    "SAELensTrainConfig",
    "TrackingConfig",
    "TrainConfig",
    "fingerprint",
    "load_recipe",
    "sae_algorithm",
    "schedule_step",
    "to_dict",
    "train_identity",
    "train_steps",
]
