"""Collection: text -> model -> resid_post activations (+ sink filter) -> HDF5 shards, under Accelerate.

Forward batch b is always the same sequences (rows b*batch_size ...), whatever the number of processes,
so the batch medians, the kept set and the cache contents do not depend on it. Batches are grouped into
shards of `collect.shard_batches`; process r of W writes the shards whose index is r mod W. A shard is
written under a `.partial` name and renamed when complete, so re-running the same command after a crash
redoes only the shards that were not finished (and any finished shard found missing or damaged).

    workbench collect recipes/demo.yaml collect.batch_size=8
    accelerate launch --num_processes 2 -m workbench collect recipes/demo.yaml
"""

from __future__ import annotations

import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from workbench import data as data_mod
from workbench.cache import buffer
from workbench.cache.layout import (
    LOCK_FILE,
    MANIFEST,
    Manifest,
    Summary,
    shard_is_complete,
    shard_name,
    shard_stats,
    to_stored,
    verify_shard,
)
from workbench.cache.reader import prefetch
from workbench.cache.writer import ShardWriter, write_error
from workbench.config import Recipe, fingerprint, to_dict
from workbench.dist import on_main_first, process_state, resolve_device
from workbench.errors import WorkbenchError
from workbench.files import folder_lock
from workbench.model import (
    capture_resid_post,
    d_model_of,
    load_config,
    load_model,
    load_tokenizer,
    max_context_of,
    num_layers_of,
    resolve_layers,
)
from workbench.sink import FIRST_TOKEN, SINK, drop_reasons, first_token_mask, keep_mask, sink_filter
from workbench.tracking import check_trackers, tracker_run


def cache_identity(recipe: Recipe) -> dict:
    """The recipe fields that determine a cache's contents (not where it is written or on which device)."""
    collect = to_dict(recipe.collect)
    for key in ("out", "device", "max_shards_on_disk", "holdout_shards"):
        collect.pop(key)
    identity = {"model": to_dict(recipe.model), "data": to_dict(recipe.data), "collect": collect}
    if recipe.collect.max_shards_on_disk is not None:  # a bounded buffer (cache/buffer.py): which shards are kept
        identity["buffer"] = {"holdout_shards": recipe.collect.holdout_shards}
    return identity


def _inspect_dir(out: Path, identity: dict) -> Manifest | None:
    """Check the output directory against the recipe. Returns the existing manifest, if any; changes nothing."""
    manifest = Manifest.read(out)
    if manifest is not None:
        if not manifest.is_cache:
            raise WorkbenchError(f"{manifest.path} is not an activation-cache manifest; choose another collect.out")
        if manifest.data.get("fingerprint") != fingerprint(identity):
            diffs = [f"{sec}.{k}" for sec in identity for k in identity[sec]
                     if manifest.data["recipe"].get(sec, {}).get(k) != identity[sec][k]]
            raise WorkbenchError(f"{out} holds a cache made by a different recipe (differs in {', '.join(diffs) or 'its recipe'}); "
                                 "choose another collect.out or delete that directory; nothing was changed")
        return manifest
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"collect.out {out} is a file, not a directory; choose another collect.out")
    # A crash between creating the directory and writing the manifest leaves at most the lock and a
    # manifest.json.tmp.
    if out.is_dir() and any(p.name not in (MANIFEST + ".tmp", LOCK_FILE) for p in out.iterdir()):
        raise WorkbenchError(f"{out} exists and is not an activation cache; choose another collect.out or empty it")
    return None


def _damaged_shards(out: Path, manifest: Manifest, state) -> list[tuple[str, str]]:
    """The shards of a complete cache to redo, as (file, why): missing, truncated, unreadable, or not
    matching their checksums. Every process reads its share (shard i on process i mod W, like the
    writing) and all get the whole list. A shard that is whole but disagrees with the manifest means
    the manifest was edited: that is one error naming manifest.json, and nothing is deleted."""
    from workbench.progress import progress

    shards = manifest.data["shards"]
    gone = buffer.released(manifest.data)
    mine = [i for i in range(state.process_index, len(shards), state.num_processes) if i not in gone]
    found = []
    for index in progress(mine, desc="verify", unit="shard", disable=not state.is_main_process or len(mine) < 2,
                          leave=False):
        check = verify_shard(out / shards[index]["file"], shards[index].get("bytes"), manifest.shard_expectations(index))
        if check.damaged or check.mismatch:
            found.append((shards[index]["file"], check.damaged, check.mismatch))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        found = gather_object(found)
    for file, _, mismatch in found:
        if mismatch:
            raise manifest.mismatch(out / file, mismatch)
    return sorted((file, damaged) for file, damaged, _ in found)


def _reopen(out: Path, manifest: Manifest, damaged: list[tuple[str, str]]) -> Manifest:
    """Mark a complete cache incomplete and delete its damaged shards, so that collection redoes them."""
    print(f"cache {out}: redoing {len(damaged)} missing or damaged shard(s): "
          f"{'; '.join(f'{Path(file).name} ({why})' for file, why in damaged)}", file=sys.stderr)
    manifest = manifest.reopen()
    for file, _ in damaged:
        (out / file).unlink(missing_ok=True)
    return manifest


class _CacheLock:
    """The cache folder's single-writer lock (files.folder_lock), held by the main process only: the
    other processes under `accelerate launch` are the same run. It is taken once the folder is known to
    be this recipe's cache (or is about to become one), so a folder that is not a cache never gets a
    lock file, and released when collection ends (or the process dies)."""

    def __init__(self, out: Path):
        self.out = out
        self._held = ExitStack()
        self.taken = False

    def take(self) -> None:
        if self.taken:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.out, err) from None
        self._held.enter_context(folder_lock(self.out, "workbench collect"))
        self.taken = True

    def __enter__(self) -> _CacheLock:
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()


class _Interrupts:
    """SIGINT and SIGTERM while collecting: both end it as KeyboardInterrupt (the CLI prints one line
    and exits 130).

    Inside `deferred()` (the collection loop and its clean-up) a signal is only recorded, and `check()`
    raises it between forward batches: so it never lands inside a write, a clean-up or a callback that
    would swallow it, and the tokenizer and writer threads are stopped and joined before the process
    exits (a thread left in native code at exit aborts it). Outside, a signal raises at once, as
    Python's own SIGINT handler does, and is raised again by the next check() should something have
    swallowed it. A second signal always raises at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending = False
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        again = self.pending
        self.pending = True
        if again or not self._deferring:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()


def collect(recipe: Recipe, model: torch.nn.Module | None = None, tokenizer=None) -> Summary:
    """Run collection for a recipe (one process, or one of several under `accelerate launch`).

    A model and tokenizer already loaded from recipe.model may be passed in (a notebook, a benchmark);
    by default they are loaded here. Returns the cache's summary (with this run's speed on the main process).
    A second `collect` on the same collect.out fails at once while this one runs (the folder's lock).
    """
    check_trackers(recipe)
    state = process_state(cpu=recipe.collect.device == "cpu")
    with _Interrupts() as interrupts, _CacheLock(Path(recipe.collect.out)) as lock:
        return _collect(recipe, model, tokenizer, state, interrupts, lock)


def _collect(recipe: Recipe, model: torch.nn.Module | None, tokenizer, state, interrupts: _Interrupts,
             lock: _CacheLock) -> Summary:
    c, d = recipe.collect, recipe.data
    device = resolve_device(c.device, state, "collect.device")
    out = Path(c.out)
    identity = cache_identity(recipe)

    def check_dir() -> Manifest | None:
        _inspect_dir(out, identity)  # refuses a folder that is not this recipe's cache, before locking it
        if not out.is_dir():
            return None  # locked when it is made, after every check
        lock.take()
        return _inspect_dir(out, identity)  # again: it may have changed before the lock was ours

    manifest = on_main_first(state, check_dir)
    if manifest is not None and manifest.complete:
        damaged = _damaged_shards(out, manifest, state)
        if not damaged:
            summary = manifest.summary()
            if state.is_main_process:
                print(f"cache {out} is already complete; nothing to do")
                print(summary.table())
            return summary
        manifest = on_main_first(state, lambda: _reopen(out, manifest, damaged))

    # Everything a user can get wrong is checked before the weights load.
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model)
    config = model.config if model is not None else load_config(recipe.model)
    num_layers = num_layers_of(config)
    layers = resolve_layers(list(c.layers), num_layers)
    max_ctx = max_context_of(config)
    if max_ctx is not None and d.context_length > max_ctx:
        raise WorkbenchError(f"data.context_length {d.context_length} is beyond the model's {max_ctx} positions; lower it")
    batches = data_mod.iter_batches(data_mod.iter_rows(d, tokenizer), c.batch_size, tokenizer.pad_token_id)
    first = next(batches, None)  # iter_rows raises for a missing or empty corpus
    if first is None:
        raise WorkbenchError(f"data.path {d.path} gave no rows; add text")
    batches = chain([first], batches)
    if model is None:
        model = load_model(recipe.model, device)
    else:
        device = next(model.parameters()).device
    d_model = d_model_of(model)
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    store_dtype = model_dtype if c.store_dtype == "model" else c.store_dtype
    requested_rows = data_mod.num_rows(d)

    def create() -> Manifest:
        lock.take()
        current = _inspect_dir(out, identity)  # another run may have made it since check_dir
        if current is not None:
            found = {"layers": layers, "d_model": d_model, "store_dtype": store_dtype, "num_model_layers": num_layers}
            changed = [k for k, v in found.items() if current.data.get(k) != v]
            if changed:
                raise WorkbenchError(f"{current.path} records {', '.join(f'{k} {current.data.get(k)}' for k in changed)} but "
                                     f"the model gives {', '.join(f'{k} {found[k]}' for k in changed)}: the model changed "
                                     "since the cache was started (or the manifest was edited); choose another "
                                     "collect.out; nothing was changed")
            return current
        bounded = None if c.max_shards_on_disk is None else {"max_shards_on_disk": c.max_shards_on_disk,
                                                             "holdout_shards": c.holdout_shards}
        return Manifest.create(out, fingerprint(identity), identity, layers, num_layers, d_model, store_dtype,
                               model_dtype, tokenizer.bos_token_id, tokenizer.pad_token_id, requested_rows, bounded)

    manifest = on_main_first(state, create)

    # Which shards are left: decided once, before the loop, from the expected number of shards.
    rows_per_shard = c.batch_size * c.shard_batches
    expected_shards = math.ceil(requested_rows / rows_per_shard)
    gone = buffer.released(Manifest.read(out).data)  # a bounded cache's shards that training consumed and deleted
    done_before = {s for s in range(expected_shards) if s in gone or shard_is_complete(out / shard_name(s))}
    state.wait_for_everyone()  # every process has looked before any writes
    mine = [s for s in range(expected_shards) if s % state.num_processes == state.process_index and s not in done_before]
    if state.is_main_process and done_before:
        print(f"cache {out}: resuming, {len(done_before)} of {expected_shards} shards already complete", file=sys.stderr)
    todo_rows = sum(min(rows_per_shard, requested_rows - s * rows_per_shard) for s in mine)

    start = time.perf_counter()
    with interrupts.deferred():
        room = None
        if c.max_shards_on_disk is not None:
            def room(shard: int, check: Callable[[], None]) -> None:
                buffer.release(out)  # what trainers released (all of it, once they are done)
                buffer.wait_for_room(out, shard, c.max_shards_on_disk, layers, c.holdout_shards, show=True, check=check)
        num_batches = _collect_shards(model, batches, set(mine), layers, d_model, store_dtype, recipe,
                                      tokenizer.bos_token_id, device, todo_rows * d.context_length,
                                      state.is_main_process, (state.process_index, state.num_processes),
                                      interrupts.check, room)
    seconds = time.perf_counter() - start
    state.wait_for_everyone()

    summary = on_main_first(state, lambda: _finalize(out, num_batches, c.shard_batches, done_before))
    summary.seconds = seconds
    if state.is_main_process:
        print(summary.table())
    with tracker_run(recipe, "collect", to_dict(recipe), state.is_main_process) as track:
        track(_tracked(summary), summary.shards)
    state.wait_for_everyone()
    return summary


def _tracked(summary: Summary) -> dict[str, float]:
    """The collection statistics sent to the trackers: the cache's size, this run's speed, and per layer
    the fractions of stored tokens dropped as sinks and as first tokens."""
    values = {"tokens": summary.tokens, "sequences": summary.sequences, "shards": summary.shards,
              "bytes": summary.bytes, "tokens_this_run": summary.tokens_this_run}
    if summary.seconds > 0:
        values["tokens_per_s"] = summary.tokens_this_run / summary.seconds
    for layer, s in summary.layers.items():
        values |= {f"layer_{layer}/kept": s.kept, f"layer_{layer}/sink_rate": s.sink / max(summary.tokens, 1),
                   f"layer_{layer}/first_token_rate": s.first_token / max(summary.tokens, 1)}
    return values


class _Writes:
    """The HDF5 side of collection, in one background thread and in submission order, so that writing
    a batch (and fsyncing a finished shard) overlaps the next forward. At most `depth` operations wait
    (bounded memory); the first error stops the work and is raised in the collecting thread."""

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="workbench-writes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (op := self._queue.get()) is not None:
            if self._error is None:  # after an error, drain without running so submit() never blocks
                try:
                    op()
                except BaseException as err:  # re-raised in the collecting thread
                    self._error = err

    def submit(self, fn: Callable, *args) -> None:
        self.raise_error()
        self._queue.put(lambda: fn(*args))

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        """Wait until everything submitted is done (or failed); the thread ends."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _collect_shards(model, batches: Iterator[data_mod.Batch], todo: set[int], layers: list[int], d_model: int,
                    store_dtype: str, recipe: Recipe, bos: int | None, device: torch.device, total_tokens: int,
                    show_progress: bool, process: tuple[int, int], check_interrupt: Callable[[], None],
                    room: Callable[[int, Callable[[], None]], None] | None = None) -> int:
    """The loop: forward the batches of the shards in `todo`, write them. room(shard, check): in a bounded
    cache, waits until the buffer has room for the shard. Returns the number of batches
    in the data (every process iterates all of them, so all agree on it). Tokenization runs ahead in a
    background thread and the writes behind in another, both overlapping the forward. check_interrupt
    runs before each batch: an interrupt or an error stops the loop there; both threads finish what
    they are doing and end, the shard being written is deleted and every finished shard is kept."""
    from workbench.progress import progress

    c, ctx = recipe.collect, recipe.data.context_length
    out = Path(c.out)
    bar = progress(total=total_tokens, unit="tok", unit_scale=True, desc="collect", disable=not show_progress)
    writes = _Writes()
    writer: ShardWriter | None = None
    stats: dict = {}
    num_batches = 0
    try:
        with capture_resid_post(model, layers) as run, closing(prefetch(batches, depth=4)) as stream:
            for batch in stream:
                check_interrupt()
                num_batches = batch.index + 1
                shard = batch.index // c.shard_batches
                if shard not in todo:
                    continue
                if writer is None or writer.final != out / shard_name(shard):
                    if writer is not None:
                        writes.submit(writer.finish, stats)
                    if room is not None:
                        room(shard, check_interrupt)
                    writer = ShardWriter(out, shard, batch.index, layers, d_model, store_dtype,
                                          process)
                    stats = shard_stats(layers)
                tokens, per_layer = _process_batch(run, batch, device, layers, recipe, bos, store_dtype, stats)
                writes.submit(writer.append, tokens, per_layer)
                bar.update(len(batch.sequence_B) * ctx)
            if writer is not None:
                writes.submit(writer.finish, stats)
            writes.join()
            writes.raise_error()
            writer = None
    finally:
        writes.join()
        if writer is not None:
            writer.abort()
        bar.close()
    return num_batches


def _process_batch(run, batch: data_mod.Batch, device: torch.device, layers: list[int], recipe: Recipe,
                   bos: int | None, store_dtype: str, stats: dict) -> tuple[dict, dict]:
    """One forward; the sink filter and first-token removal per layer. Returns what ShardWriter.append
    takes for every non-padding token, and adds the counts to `stats`. A NaN or Inf among them (from the
    model, or from the conversion to store_dtype) is a WorkbenchError: it is never stored."""
    c = recipe.collect
    ids_BL, mask_BL = batch.input_ids_BL, batch.attention_mask_BL
    acts = run(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device))
    valid_BL = mask_BL.bool()
    first_BL = first_token_mask(ids_BL, mask_BL, bos) if c.drop_first_token else torch.zeros_like(valid_BL)
    B, L = ids_BL.shape
    tokens = {
        "token_id": ids_BL[valid_BL].to(torch.int32).numpy(),
        "sequence": batch.sequence_B[:, None].expand(B, L)[valid_BL].numpy(),
        "position": torch.arange(L, dtype=torch.int32).expand(B, L)[valid_BL].numpy(),
        "batch": np.full(int(valid_BL.sum()), batch.index, np.int32),
    }
    valid_dev_BL = valid_BL.to(device)
    per_layer = {}
    for layer in layers:
        acts_BLD = acts[layer]
        flt = sink_filter(acts_BLD, c.sink_multiple, valid_dev_BL, c.sink_median)
        acts_ND = acts_BLD[valid_dev_BL]
        stored_ND = acts_ND.to(getattr(torch, store_dtype))
        finite_N = torch.isfinite(stored_ND).all(dim=1)
        if not bool(finite_N.all()):
            raise _nonfinite_error(recipe, layer, batch.index, tokens, acts_ND, finite_N, store_dtype)
        reason = drop_reasons(keep_mask(valid_BL, flt.sink_BL.cpu(), first_BL), first_BL)[valid_BL].numpy()
        per_layer[layer] = {
            "activations": to_stored(stored_ND.cpu(), store_dtype),
            "norm": flt.norms_BL[valid_dev_BL].cpu().numpy(),
            "drop_reason": reason,
            "batch_median": flt.median.item(),
        }
        counts = np.bincount(reason, minlength=3)
        s = stats["layers"][str(layer)]
        s["kept"] += int(counts[0])
        s["first_token"] += int(counts[FIRST_TOKEN])
        s["sink"] += int(counts[SINK])
    stats["tokens"] += len(tokens["token_id"])
    stats["sequences"] += B
    return tokens, per_layer


def _nonfinite_error(recipe: Recipe, layer: int, batch: int, tokens: dict, acts_ND: torch.Tensor, finite_N: torch.Tensor,
                     store_dtype: str) -> WorkbenchError:
    """What collection says for non-finite activations: where, and the fix for where they come from."""
    rows = torch.nonzero(~finite_N).flatten().cpu().numpy()
    where = ", ".join(f"sequence {tokens['sequence'][i]} position {tokens['position'][i]}" for i in rows[:3])
    where += f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    model_dtype = str(acts_ND.dtype).removeprefix("torch.")
    if bool(torch.isfinite(acts_ND[torch.from_numpy(rows).to(acts_ND.device)]).all()):
        fix = (f"they are finite in the model's {model_dtype} but beyond the range of collect.store_dtype "
               f"{store_dtype}: set collect.store_dtype=bfloat16 or float32")
    elif model_dtype == "float16":
        fix = "float16 overflows in this model: load it in bfloat16 or float32 (model.dtype=bfloat16)"
    else:
        fix = (f"the model computes them in {model_dtype}: check its weights ({recipe.model.name}) for NaN or Inf"
               + (", or load it in float32 (model.dtype=float32)" if model_dtype == "bfloat16" else ""))
    return WorkbenchError(f"layer {layer} gave non-finite activations (NaN or Inf) in forward batch {batch}, at "
                          f"{len(rows)} token(s): {where}; {fix} (a changed recipe needs a new collect.out); nothing "
                          "non-finite was stored and the finished shards are kept")


def _finalize(out: Path, num_batches: int, shard_batches: int, done_before: set[int]) -> Summary:
    """Mark the cache complete (Manifest.finalise) once every shard of the data's batches is written.
    done_before: the shards that were complete before this run (for this run's speed). The manifest is read
    again: in a bounded cache, training records the shards it releases in it while collection runs."""
    if num_batches == 0:
        raise WorkbenchError("the data gave no rows; check data.path")
    manifest = Manifest.read(out)
    if not buffer.is_bounded(manifest.data):
        return manifest.finalise(math.ceil(num_batches / shard_batches), done_before)
    with buffer.manifest_lock(out):
        summary = Manifest.read(out).finalise(math.ceil(num_batches / shard_batches), done_before)
    buffer.release(out)  # what a trainer that finished (or released everything) left to delete
    return summary


def is_collected(recipe: Recipe) -> bool:
    """Whether collect.out holds this recipe's complete cache: the pipeline's check, from the cache's own
    files (its manifest, and every shard there, whole, at its recorded size). A deleted or truncated
    shard makes it unfinished, so the collect stage redoes it; the checksums are `inspect --verify`'s."""
    out = Path(recipe.collect.out)
    try:
        manifest = Manifest.read(out)
    except WorkbenchError:
        return False  # collect itself says what is wrong
    if manifest is None or not manifest.is_cache or not manifest.complete:
        return False
    if manifest.data.get("fingerprint") != fingerprint(cache_identity(recipe)):
        return False
    gone = buffer.released(manifest.data)
    return all(shard_is_complete(out / s["file"], s.get("bytes")) for i, s in enumerate(manifest.data["shards"]) if i not in gone)
