"""What a recipe means before anything runs: `workbench plan RECIPE` (and `run --dry-run`).

Resolved layers, d_model, sequences and tokens, cache size on disk, training steps per SAE and every
output path, computed from the recipe alone: no weights are loaded. The model's shape comes from
`model.num_layers` / `model.d_model` when the recipe states them (works offline), else from the model's
config file only (AutoConfig).

Cache size is the formula of the cache layout (workbench/cache/layout.py: cache_bytes), uncompressed,
without HDF5's own overhead (about 40 kB a shard: headers, chunk indexes; tests/test_plan.py checks the
formula against a real collection):
    per token            token_id int32 + sequence int64 + position int32 + batch int32  = 20 B
    per token per layer  activations d_model x itemsize(stored dtype) + norm float32 + drop_reason uint8
                         + kept bool                                                    = D*s + 6 B
    per batch per layer  batch_median float32                                           = 4 B
Every non-padding token read is stored (dropped tokens too, with their drop reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from workbench.cache.layout import (
    LAYER_TOKEN_BYTES,
    STORE_NUMPY,
    TOKEN_BYTES,
    cache_bytes,
    layer_bytes,
    store_itemsize,
)
from workbench.config import Recipe, sae_algorithm, schedule_step, train_steps
from workbench.data import num_rows
from workbench.errors import WorkbenchError
from workbench.export import default_series_name, export_id
from workbench.model import d_model_of, load_config, num_layers_of, resolve_layers, text_config
from workbench.sae.registry import ARCHITECTURES, MATRYOSHKA
from workbench.training import auto_lr, layer_dir


@dataclass
class SAEPlan:
    """One SAE of the run: its shape, learning rate, size and where it is written."""

    layer: int
    name: str
    arch: str
    width: int
    k: int
    group_sizes: list[int] | None
    lr: float
    weights_bytes: int  # float32 parameters as saved (ae.pt / safetensors), without file overhead
    train_dir: str
    export_dirs: dict[str, str]


@dataclass
class PipelinePlan:
    """Everything a recipe implies, as numbers and paths (`render` prints it)."""

    recipe_path: str | None
    model: str
    num_layers: int
    d_model: int
    shape_source: str  # "recipe" or "model config"
    layer_spec: list
    layers: list[int]
    store_dtype: str
    # data
    data_path: str
    context_length: int
    packing: bool
    sequences: int
    tokens: int  # tokens read and stored; an upper bound when rows are not packed
    first_tokens: int  # dropped by first-token removal (one a row), 0 when it is off
    # collection and cache
    forward_batches: int
    shards: int
    bytes_per_token_per_layer: int  # activations only: d_model x itemsize
    cache_bytes_per_layer: int  # activations + per-layer metadata + batch medians
    cache_bytes: int
    shard_bytes: int  # a full shard, approximately
    cache_dir: str
    # the cache as a bounded buffer (collect.max_shards_on_disk; its value, or suggested_buffer's when null)
    buffer_shards: int
    buffer_set: bool  # whether the recipe sets collect.max_shards_on_disk
    holdout_shards: int
    shuffle_shards: int
    # training
    train_tokens: int
    train_batch_size: int
    steps: int  # per SAE: train_tokens // train_batch_size
    warmup_steps: int
    decay_start_step: int | None
    k_anneal_steps: int
    holdout_tokens: int  # train.eval_tokens + threshold.num_tokens, also taken from the cache
    saelens_saes: list[str]  # the SAEs trained with SAELens' algorithm, and its schedule in words
    saelens_schedule: str
    saes: list[SAEPlan]
    train_dir: str
    # export and evaluation
    export_formats: list[str]
    series_name: str
    eval_tokens: int
    eval_source: str
    target_explained_variance: dict[int, float]
    warnings: list[str] = field(default_factory=list)

    def buffer_bytes(self, collectors: int = 1) -> int:
        """The most a bounded buffer holds on disk: its unreleased shards, the held-out ones, and the one each
        collecting process is writing."""
        return (self.buffer_shards + self.holdout_shards + collectors) * self.shard_bytes

    @property
    def max_kept_tokens(self) -> int:
        """Stored tokens minus the first tokens: the most the trainer can use (sinks remove more)."""
        return self.tokens - self.first_tokens


def _read_config(recipe: Recipe):
    """The model's config file only (model.load_config: no weights), with the offline fix in the error."""
    try:
        return load_config(recipe.model)
    except WorkbenchError as err:
        raise WorkbenchError(f"{err}; to plan offline, state the model's shape in the recipe: model.num_layers and "
                             "model.d_model, and a model.dtype other than auto") from None


def model_shape(recipe: Recipe) -> tuple[int, int, str]:
    """(num_layers, d_model, source) without loading weights: from the recipe when it states both."""
    m = recipe.model
    if m.num_layers is not None and m.d_model is not None:
        return m.num_layers, m.d_model, "recipe"
    config = _read_config(recipe)
    num_layers = m.num_layers if m.num_layers is not None else num_layers_of(config)
    d_model = m.d_model if m.d_model is not None else d_model_of(config)
    return num_layers, d_model, "model config"


def store_dtype(recipe: Recipe) -> str:
    """The dtype activations are stored in: collect.store_dtype, else model.dtype, else (auto) the
    checkpoint's dtype from its config file."""
    if recipe.collect.store_dtype != "model":
        return recipe.collect.store_dtype
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    config = _read_config(recipe)
    dtype = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None)
    name = str(dtype).removeprefix("torch.")
    if name not in STORE_NUMPY:
        raise WorkbenchError(f"the config of model.name '{recipe.model.name}' does not name a float dtype (got {dtype}); "
                             "set model.dtype or collect.store_dtype in the recipe")
    return name


def series_name(recipe: Recipe) -> str:
    """export.series_name, else the name export gives the series (export.default_series_name)."""
    all_matryoshka = all(ARCHITECTURES[s.arch] is MATRYOSHKA for s in recipe.train.saes)
    return recipe.export.series_name or default_series_name(recipe.model.name, all_matryoshka)


def train_dir(recipe: Recipe, layer: int, name: str) -> Path:
    """Where the trainer writes an SAE: <train.out>/resid_post_layer_<L>/<name>."""
    return layer_dir(recipe.train.out, layer) / name


def export_dir(recipe: Recipe, fmt: str, layer: int, name: str) -> Path:
    """Where export.export_run writes an SAE: <export.out>/<format>/<its export_id>."""
    several = len(recipe.train.saes) > 1
    return Path(recipe.export.out) / fmt / export_id(fmt, series_name(recipe), layer, name, several_in_layer=several)


def plan(recipe: Recipe, recipe_path: str | None = None) -> PipelinePlan:
    """Everything the recipe implies, computed without loading weights (see the module docstring)."""
    c, d, t = recipe.collect, recipe.data, recipe.train
    num_layers, d_model, source = model_shape(recipe)
    layers = resolve_layers(list(c.layers), num_layers)
    stored = store_dtype(recipe)

    sequences = num_rows(d)
    tokens = sequences * d.context_length
    first_tokens = sequences if c.drop_first_token else 0
    batches = math.ceil(sequences / c.batch_size)
    shards = math.ceil(batches / c.shard_batches)
    act_bytes = d_model * store_itemsize(stored)
    shard_tokens = c.shard_batches * c.batch_size * d.context_length

    steps = train_steps(t)
    train_layers = _train_layers(recipe, layers, num_layers)
    saes = []
    for layer in train_layers:
        for s in t.saes:
            arch = ARCHITECTURES[s.arch]
            sizes = arch.group_sizes(s.width, s.group_fractions)
            saes.append(SAEPlan(
                layer=layer, name=s.name, arch=s.arch, width=s.width, k=s.k, group_sizes=sizes,
                lr=t.saelens.lr if sae_algorithm(t, s) == "saelens" else t.lr if t.lr is not None else auto_lr(s.width),
                weights_bytes=arch.weights_bytes(d_model, s.width, sizes),
                train_dir=str(train_dir(recipe, layer, s.name)),
                export_dirs={f: str(export_dir(recipe, f, layer, s.name)) for f in recipe.export.formats},
            ))

    ev = recipe.eval
    eval_source = (f"split '{ev.split}' of {d.path} from its start" if ev.split
                   else f"rows {sequences:,} onwards of {d.path} (after the rows the cache read)")
    p = PipelinePlan(
        recipe_path=recipe_path, model=recipe.model.name, num_layers=num_layers, d_model=d_model,
        shape_source=source, layer_spec=list(c.layers), layers=layers, store_dtype=stored,
        data_path=d.path, context_length=d.context_length, packing=d.packing, sequences=sequences,
        tokens=tokens, first_tokens=first_tokens, forward_batches=batches, shards=shards,
        bytes_per_token_per_layer=act_bytes,
        cache_bytes_per_layer=layer_bytes(tokens, batches, d_model, stored),
        cache_bytes=cache_bytes(tokens, batches, d_model, stored, len(layers)),
        shard_bytes=cache_bytes(shard_tokens, 0, d_model, stored, len(layers)),  # its batch medians: negligible
        cache_dir=c.out, buffer_shards=c.max_shards_on_disk or suggested_buffer(t, shard_tokens),
        buffer_set=c.max_shards_on_disk is not None, holdout_shards=c.holdout_shards, shuffle_shards=t.shuffle_shards,
        train_tokens=t.num_tokens, train_batch_size=t.batch_size,
        steps=steps, warmup_steps=t.warmup_steps, decay_start_step=schedule_step(t.decay_start, steps),
        k_anneal_steps=schedule_step(t.k_anneal_steps, steps) or 0,
        holdout_tokens=t.eval_tokens + recipe.threshold.num_tokens, saes=saes, train_dir=t.out,
        saelens_saes=[s.name for s in t.saes if sae_algorithm(t, s) == "saelens"],
        saelens_schedule=(f"lr {t.saelens.lr:g} ({t.saelens.lr_scheduler_name}), warmup {t.saelens.lr_warm_up_steps:,} steps, "
                          f"linear decay over the last {t.saelens.lr_decay_steps:,}, k not annealed"),
        export_formats=list(recipe.export.formats),
        series_name=series_name(recipe),
        eval_tokens=ev.num_tokens, eval_source=eval_source,
        target_explained_variance=dict(sorted(ev.target_explained_variance.items())),
    )
    p.warnings = _warnings(recipe, p)
    return p


def _reads_own_cache(recipe: Recipe) -> bool:
    t = recipe.train
    return t.cache is None or Path(t.cache) == Path(recipe.collect.out)


def _train_layers(recipe: Recipe, collected: list[int], num_layers: int) -> list[int]:
    """train.layers (default: the collected layers), each a layer of the model and, when training reads the
    cache this recipe collects, one of the collected layers: training would fail on any other."""
    t = recipe.train
    if t.layers is None:
        return collected
    for layer in t.layers:
        if not 0 <= layer < num_layers:
            raise WorkbenchError(f"train.layers entry {layer} is out of range: the model has layers 0..{num_layers - 1}")
    missing = sorted(set(t.layers) - set(collected))
    if missing and _reads_own_cache(recipe):
        raise WorkbenchError(f"train.layers {missing} are not collected (collect.layers gives {collected}): add them "
                             "to collect.layers, or train collected layers only")
    return sorted(set(t.layers))


def _warnings(recipe: Recipe, p: PipelinePlan) -> list[str]:
    out = []
    need = p.train_tokens + p.holdout_tokens
    if need > p.max_kept_tokens:
        out.append(f"the cache will hold at most {p.max_kept_tokens:,} kept tokens (sinks remove more), fewer than the "
                   f"{need:,} that training reads (train.num_tokens + held-out eval and threshold tokens): the "
                   "trainer will reuse tokens; raise data.num_tokens to avoid it")
    untrained = sorted({s.layer for s in p.saes} - set(p.layers))
    if untrained:
        out.append(f"train.layers {untrained} are not in collect.layers ({p.layers}): train.cache "
                   f"{recipe.train.cache} must hold them")
    if p.steps == 0:
        out.append(f"train.num_tokens {p.train_tokens:,} is less than one batch of {p.train_batch_size:,}: no steps")
    missing = [L for L in p.target_explained_variance if L not in {s.layer for s in p.saes}]
    if missing:
        out.append(f"eval.target_explained_variance names layers {missing} that this run does not train")
    return out


def _bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def suggested_buffer(t, shard_tokens: int) -> int:
    """A max_shards_on_disk that lets collection run a window ahead of training without early checkpoints: the
    window being read, the next, and the windows between two checkpoints (train.checkpoint_every steps)."""
    window_tokens = t.shuffle_shards * shard_tokens
    return t.shuffle_shards * (2 + math.ceil(t.checkpoint_every * t.batch_size / window_tokens))


def render(p: PipelinePlan) -> str:
    """The plan as text for the terminal (decimal units: 1 TB = 10^12 bytes)."""
    bound = "" if p.packing else " (at most: rows are not packed)"
    lines = [
        f"recipe     {p.recipe_path or '(defaults)'}",
        f"model      {p.model}: {p.num_layers} layers, d_model {p.d_model} (shape from the {p.shape_source}); "
        f"activations stored as {p.store_dtype}",
        f"layers     {p.layer_spec} -> {', '.join(map(str, p.layers))}",
        f"data       {p.data_path}, context {p.context_length:,}: {p.sequences:,} sequences = {p.tokens:,} tokens{bound}; "
        f"{p.first_tokens:,} first tokens dropped, at most {p.max_kept_tokens:,} kept",
        f"collect    {p.forward_batches:,} forward batches in {p.shards:,} shards (about {_bytes(p.shard_bytes)} each)",
        f"cache      {p.cache_dir}: {_bytes(p.cache_bytes)} ({p.cache_bytes:,} bytes"
        f"{f', {p.cache_bytes / 2**40:,.2f} TiB' if p.cache_bytes >= 2**40 else ''}) uncompressed, without HDF5 overhead",
        f"           per token per layer {p.bytes_per_token_per_layer:,} B activations ({p.d_model} x "
        f"{store_itemsize(p.store_dtype)} B {p.store_dtype}) + {LAYER_TOKEN_BYTES} B (norm, drop_reason, kept); "
        f"per token {TOKEN_BYTES} B (token_id, sequence, position, batch)",
        f"           per layer {_bytes(p.cache_bytes_per_layer)}",
        (f"buffer     as a bounded buffer ({'collect.max_shards_on_disk' if p.buffer_set else 'if collect.max_shards_on_disk were'} "
         f"{p.buffer_shards}, {p.holdout_shards} held-out shard(s)): at most {_bytes(p.buffer_bytes())} with one collecting "
         f"process, + {_bytes(p.shard_bytes)} for each more; training reads windows of {p.shuffle_shards} shards "
         f"({p.shuffle_shards * p.shard_bytes / max(1, len(p.layers)) / 1e9:,.2f} GB a layer in memory)"),
        f"train      {p.train_tokens:,} tokens / batch {p.train_batch_size:,} = {p.steps:,} steps per SAE "
        f"(rounded down; {p.train_tokens - p.steps * p.train_batch_size:,} tokens left over)",
        *([f"           SAELens' algorithm for {', '.join(p.saelens_saes)}: {p.saelens_schedule}"] if p.saelens_saes else []),
        *([f"           {'dictionary_learning: ' if p.saelens_saes else ''}warmup {p.warmup_steps:,} steps, lr decay "
           f"from step {'-' if p.decay_start_step is None else f'{p.decay_start_step:,}'}, "
           f"{f'k annealed over {p.k_anneal_steps:,} steps' if p.k_anneal_steps else 'k not annealed'}"]
          if len(p.saelens_saes) < len(p.saes) // max(1, len({s.layer for s in p.saes})) else []),
        f"           {p.holdout_tokens:,} cache tokens held out for evaluation",
        f"           {len(p.saes)} SAEs, {_bytes(sum(s.weights_bytes for s in p.saes))} of float32 weights in all",
        f"  {'layer':>5} {'name':<12} {'arch':<10} {'width':>7} {'k':>4} {'lr':>9} {'weights':>10}  trained into",
    ]
    for s in p.saes:
        groups = f" groups {s.group_sizes}" if s.group_sizes else ""
        lines.append(f"  {s.layer:>5} {s.name:<12} {s.arch:<10} {s.width:>7} {s.k:>4} {s.lr:>9.3g} "
                     f"{_bytes(s.weights_bytes):>10}  {s.train_dir}{groups}")
    lines.append(f"export     {', '.join(p.export_formats) or '(none)'}; series {p.series_name}")
    for s in p.saes:
        for fmt, path in s.export_dirs.items():
            lines.append(f"  {fmt:<20} {path}")
    lines.append(f"eval       {p.eval_tokens:,} held-out text tokens: {p.eval_source}")
    if p.target_explained_variance:
        lines.append("target     published explained variance per layer (compare the reproduction with it)")
        lines.append("  " + "  ".join(f"L{layer} {fve:.3f}" for layer, fve in p.target_explained_variance.items()))
    lines += [f"WARNING    {w}" for w in p.warnings]
    return "\n".join(lines)
