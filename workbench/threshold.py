"""`workbench threshold SAE`: the scalar JumpReLU threshold of a BatchTopK or Matryoshka SAE.

Batch top-k activations depend on the whole batch; at inference each token is encoded alone by the
JumpReLU rule f = pre * (pre > threshold). Three estimators of the threshold, all in raw activation
units (the checkpoint works on raw activations; the cache holds raw activations):

    ema        the training estimate already in the checkpoint (an EMA of each batch's smallest kept value)
    batch-min  the BatchTopK paper's estimator: the mean, over held-out batches of `batch_size` tokens,
               of the smallest positive batch-top-k activation (so it depends on the batch size)
    l0         the threshold at which the mean JumpReLU L0 over the N held-out tokens is exactly k:
               the (k*N + 1)-th largest pre-activation among all N x F of them

Each is reported with the JumpReLU SAE's L0 and FVE next to batch-top-k inference on the same tokens.
The chosen threshold is written into ae.pt; config.json's workbench section records it, the method,
the previous threshold and method, and the report; eval_results.json's keys are re-measured at the new
threshold on the same held-out tokens (workbench.metrics.evaluate_sae; keys it does not compute, such as the
LM-loss ones of `workbench eval`, are kept and predate the new threshold); sparsity.safetensors records
each latent's firing frequency (for SAELens exports).

The four files are written as one set: each to `<name>.staged` first, then the commit marker
`threshold.commit.json`, then renamed into place. A kill before the marker leaves the SAE as it was; a
kill after it leaves a write that the next `workbench threshold`, `workbench eval` or pipeline run
completes (`finish_interrupted_write`) before it reads the folder, so ae.pt's threshold and
config.json's history never disagree.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from workbench.cache import ActivationCache
from workbench.config import ThresholdConfig
from workbench.dist import process_state, resolve_device
from workbench.errors import WorkbenchError
from workbench.files import fsync_dir, read_json_object, write_atomic, write_error, write_json
from workbench.formats import dictionary_learning as dl
from workbench.hub import is_hub_ref
from workbench.metrics import evaluate_sae, frac_variance_explained
from workbench.provenance import Provenance, ThresholdHistory
from workbench.sae import SAE, batch_topk, jumprelu

METHODS = ("ema", "batch-min", "l0")
DEFAULT_BATCH_SIZE = 2048  # when the SAE's config records no training batch size
WRITTEN = (dl.AE_FILE, dl.CONFIG_FILE, dl.EVAL_FILE, dl.SPARSITY_FILE)  # the set a threshold write replaces
STAGED = ".staged"  # <name>.staged: the new file, renamed over <name> once the commit marker is written
COMMIT_FILE = "threshold.commit.json"  # {"files": [...]}: the staged files are the SAE now


@dataclass
class MethodResult:
    """One estimator: its threshold (None: not available) and the JumpReLU SAE's L0 and FVE with it."""

    method: str
    threshold: float | None
    l0: float | None = None
    fve: float | None = None


@dataclass
class ThresholdReport:
    """The comparison `workbench threshold` prints (and records in config.json when it writes)."""

    folder: str
    k: int
    batch_size: int
    num_tokens: int
    split: str  # which cache tokens: "holdout" (never trained on) or "all" (the SAE records no split)
    batch_topk_l0: float
    batch_topk_fve: float
    methods: list[MethodResult]
    chosen: str
    previous: dict = field(default_factory=dict)
    written: bool = False

    def result(self, method: str) -> MethodResult:
        return next(m for m in self.methods if m.method == method)


Batches = Callable[[], Iterator[torch.Tensor]]


def held_out_batches(cache: ActivationCache, layer: int, batch_size: int, num_tokens: int,
                     holdout_fraction: float | None, sink_multiple: float | None, seed: int = 0) -> tuple[Batches, str]:
    """A function returning the same sequence of [batch_size, D] float32 batches on every call (two passes
    need the same tokens), at most num_tokens tokens; and which split they come from."""
    split = "holdout" if holdout_fraction else "all"
    n_batches = num_tokens // batch_size
    if n_batches == 0:
        raise WorkbenchError(f"--num-tokens {num_tokens} is less than one batch of {batch_size}; raise it or lower --batch-size")

    def batches() -> Iterator[torch.Tensor]:
        it = cache.batches(layer, batch_size, shuffle=True, seed=seed, sink_multiple=sink_multiple,
                           holdout_fraction=holdout_fraction or 0.0, split=split)
        for i, x_BD in enumerate(it):
            if i == n_batches:
                return
            yield x_BD

    return batches, split


def derive_thresholds(sae: SAE, batches: Batches, max_tokens: int, device: torch.device) -> tuple[dict[str, float | None], int]:
    """Pass 1: the batch-min and l0 estimates from at most max_tokens tokens (None: no batch had a positive
    activation). Returns ({method: threshold}, tokens seen)."""
    k = int(sae.k)
    mins: list[float] = []
    pool = torch.empty(0, device=device)  # the k*max_tokens + 1 largest pre-activations so far, for `l0`
    n_tokens = 0
    for x_BD in batches():
        pre_BF = sae.pre_acts(x_BD.to(device))
        n_tokens += pre_BF.shape[0]
        kept_BF = batch_topk(pre_BF, k)
        positive = kept_BF[kept_BF > 0]
        if positive.numel():  # a batch with no positive activation contributes nothing
            mins.append(float(positive.min()))
        # The (k*N + 1)-th largest of all N tokens is among the k*max_tokens + 1 largest seen so far.
        keep = min(k * max_tokens + 1, pre_BF.numel() + pool.numel())
        pool = torch.cat([pool, pre_BF.flatten()]).topk(keep, sorted=False).values
    if n_tokens == 0:
        raise WorkbenchError("the cache gave no held-out tokens for this layer; collect more, or lower --batch-size")
    ranked = pool.sort(descending=True).values
    l0_threshold = float(ranked[k * n_tokens]) if ranked.numel() > k * n_tokens else 0.0
    return {"batch-min": sum(mins) / len(mins) if mins else None, "l0": l0_threshold}, n_tokens


def evaluate_thresholds(sae: SAE, batches: Batches, thresholds: dict[str, float | None], chosen: str,
                        device: torch.device) -> tuple[dict[str, tuple[float, float]], tuple[float, float], torch.Tensor]:
    """Pass 2, on the same tokens: (L0, FVE) per method and for batch-top-k inference (means over
    batches, as dictionary_learning's evaluate), and how many tokens each latent fires on at the chosen
    threshold [F]."""
    k = int(sae.k)
    W_dec_FD, b_dec_D = sae.W_dec_FD.detach().contiguous(), sae.b_dec.detach()
    sums = {m: [0.0, 0.0] for m, t in thresholds.items() if t is not None}
    btk = [0.0, 0.0]
    fired_F = torch.zeros(sae.dict_size, device=device)
    n_batches = 0
    for x_BD in batches():
        x_BD = x_BD.to(device)
        pre_BF = sae.pre_acts(x_BD)
        n_batches += 1
        _accumulate(btk, x_BD, batch_topk(pre_BF, k), W_dec_FD, b_dec_D)
        for method in sums:
            f_BF = jumprelu(pre_BF, thresholds[method])  # the SAE's encode rule, on pre-activations computed once
            _accumulate(sums[method], x_BD, f_BF, W_dec_FD, b_dec_D)
            if method == chosen:
                fired_F += (f_BF > 0).sum(0)
    per_method = {m: (s[0] / n_batches, s[1] / n_batches) for m, s in sums.items()}
    return per_method, (btk[0] / n_batches, btk[1] / n_batches), fired_F.cpu()


def decode(f_BF: torch.Tensor, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor) -> torch.Tensor:
    """f @ W_dec + b_dec; on CPU through a CSR matrix (only the ~k active latents a token are touched)."""
    if f_BF.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            f_csr = f_BF.to_sparse_csr()
        return torch.sparse.mm(f_csr, W_dec_FD) + b_dec_D
    return f_BF @ W_dec_FD + b_dec_D


def _accumulate(acc: list[float], x_BD: torch.Tensor, f_BF: torch.Tensor, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor) -> None:
    """Add one batch's L0 (mean active latents a token) and FVE to acc."""
    acc[0] += float((f_BF != 0).float().sum(-1).mean())
    acc[1] += float(frac_variance_explained(x_BD, decode(f_BF, W_dec_FD, b_dec_D)))


def calibrate(folder: str | Path, cache: str | Path | None = None, method: str | None = None,
              batch_size: int | None = None, num_tokens: int | None = None, device: str | None = None,
              write: bool = True) -> ThresholdReport:
    """Derive, report and (write=True) store the JumpReLU threshold of the SAE in `folder`.

    method, num_tokens: None takes ThresholdConfig's default; batch_size: None takes the SAE's training batch
    (buffer.out_batch_size, or DEFAULT_BATCH_SIZE when it records none, as a converted SAELens SAE);
    device: None is cuda when available, else cpu."""
    defaults = ThresholdConfig()
    method = defaults.method if method is None else method
    if method not in METHODS:
        raise WorkbenchError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    for name, value in (("num-tokens", num_tokens), ("batch-size", batch_size)):
        if value is not None and (type(value) is not int or value <= 0):
            raise WorkbenchError(f"--{name} (threshold.{name.replace('-', '_')}) must be a positive number of tokens, "
                                 f"got {value!r}; give a positive integer, or leave it out for the default")
    dev = resolve_device(device, process_state(), "--device")
    if is_hub_ref(folder):  # writing would change the hub cache's copy of the repo
        raise WorkbenchError(f"{folder} is a hub reference, and `workbench threshold` writes into the SAE folder; "
                             "download it to a local folder first (`hf download OWNER/NAME --include 'PATH/*' --local-dir "
                             "DIR`) and calibrate DIR/PATH")
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is not a directory; give an SAE folder (ae.pt + config.json)")
    finish_interrupted_write(folder)
    sae, config = dl.load_folder(folder)
    provenance = (Provenance.from_dict(config.get(dl.EXTRA_SECTION), str(folder / dl.CONFIG_FILE))
                  or Provenance(version=None, recorded=frozenset()))  # an SAE the workbench did not train
    cache = cache or provenance.cache
    if cache is None:
        raise WorkbenchError(f"{folder}/config.json records no cache; pass --cache with activations of the SAE's layer")
    layer = config["trainer"].get("layer", provenance.layer)
    if layer is None:
        raise WorkbenchError(f"{folder}/config.json records no trainer.layer; cannot tell which layer of the cache to read")
    if batch_size is None:
        batch_size = (config.get("buffer") or {}).get("out_batch_size") or DEFAULT_BATCH_SIZE
    num_tokens = defaults.num_tokens if num_tokens is None else num_tokens
    sae = sae.to(dev).eval()
    with ActivationCache(cache) as c, torch.no_grad():
        if layer not in c.layers:
            raise WorkbenchError(f"the cache {cache} has no layer {layer} (it has {c.layers}); pass --cache with that layer")
        if c.d_model != sae.activation_dim:
            raise WorkbenchError(f"the cache {cache} has d_model {c.d_model}, the SAE {sae.activation_dim}")
        # The tokens the SAE was trained on: as collected, unless it recorded another sink multiple.
        sink = provenance.sink_multiple
        refilter = sink if sink is not None and sink != c.sink_multiple else None
        batches, split = held_out_batches(c, layer, batch_size, num_tokens, provenance.holdout_fraction, refilter)
        current = float(sae.threshold)
        record = provenance.threshold or ThresholdHistory()
        ema = current if record.ema is None else record.ema  # the training estimate, kept once a threshold replaced it
        found, n_tokens = derive_thresholds(sae, batches, num_tokens, dev)
        thresholds = {"ema": ema if ema >= 0 else None, **found}
        if thresholds[method] is None:
            raise WorkbenchError(f"method {method} has no estimate for {folder} (the training threshold is {ema}: "
                                 "never set in training); choose --method batch-min or l0")
        per_method, btk, fired_F = evaluate_thresholds(sae, batches, thresholds, method, dev)
        if write:
            sae.threshold.fill_(thresholds[method])
            evals = evaluate_sae(sae, batches(), context_length=config.get("buffer", {}).get("ctx_len"))
    previous = {"threshold": current, "method": record.method or ("ema" if current >= 0 else "unset")}
    report = ThresholdReport(
        folder=str(folder), k=int(sae.k), batch_size=batch_size, num_tokens=n_tokens, split=split,
        batch_topk_l0=btk[0], batch_topk_fve=btk[1], chosen=method, previous=previous,
        methods=[MethodResult(m, thresholds[m], *per_method.get(m, (None, None))) for m in METHODS])
    if write:
        _write(folder, sae, config, provenance, report, evals, fired_F / n_tokens, ema)
        report.written = True
    return report


def _write(folder: Path, sae: SAE, config: dict, provenance: Provenance, report: ThresholdReport, evals: dict,
           freq_F: torch.Tensor, ema: float) -> None:
    """ae.pt with the new threshold (set by the caller), the history in config.json, eval_results.json's
    keys re-measured at the new threshold (others kept), and sparsity.safetensors: as one set (see the
    module docstring). The files are those of dictionary_learning.save_folder and write_sparsity, under
    their staged names."""
    sae = sae.cpu()
    provenance.threshold = ThresholdHistory(
        value=float(sae.threshold), method=report.chosen, previous=report.previous, ema=ema,
        batch_size=report.batch_size, num_tokens=report.num_tokens, split=report.split,
        report={m.method: {"threshold": m.threshold, "l0": m.l0, "fve": m.fve} for m in report.methods}
        | {"batch_topk": {"l0": report.batch_topk_l0, "fve": report.batch_topk_fve}})
    config[dl.EXTRA_SECTION] = provenance.to_dict()
    eval_results = read_json_object(folder / dl.EVAL_FILE, fix="fix or delete it (the trainer wrote it)") or {}
    eval_results.update(evals)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sparsity_F = torch.log10(freq_F.float() + 1e-10).contiguous()
    staged = {name: folder / (name + STAGED) for name in WRITTEN}
    resume = "re-run the same command (the SAE was left as it was)"
    try:
        write_atomic(staged[dl.AE_FILE], lambda fh: torch.save(state, fh), resume)
        write_json(staged[dl.CONFIG_FILE], config, indent=4, resume=resume)
        write_json(staged[dl.EVAL_FILE], eval_results, indent=4, resume=resume)
        write_atomic(staged[dl.SPARSITY_FILE], lambda fh: fh.write(safetensors_bytes({"sparsity": sparsity_F})), resume)
        write_json(folder / COMMIT_FILE, {"files": list(WRITTEN)}, resume=resume)
    except WorkbenchError:
        _remove_staged(folder)
        raise
    _commit(folder, list(WRITTEN))


def finish_interrupted_write(folder: str | Path) -> bool:
    """Complete a threshold write that a kill interrupted after its commit marker (rename the staged
    files into place), or discard one interrupted before it. Returns whether one was completed."""
    folder = Path(folder)
    marker = read_json_object(folder / COMMIT_FILE, fix=f"delete it and the {STAGED} files beside it, then re-run "
                                                         "`workbench threshold`")
    if marker is not None:
        names = marker.get("files")
        if not isinstance(names, list) or not set(names) <= set(WRITTEN):
            raise WorkbenchError(f"{folder / COMMIT_FILE} does not list the files of a threshold write; delete it and the "
                                 f"{STAGED} files beside it, then re-run `workbench threshold`")
        _commit(folder, names)
        print(f"{folder}: completed the threshold write an earlier run left unfinished", file=sys.stderr)
    _remove_staged(folder)
    return marker is not None


def calibrated_method(folder: str | Path) -> str | None:
    """The method of the threshold written into the SAE in `folder` (None: never calibrated), after
    completing an interrupted write."""
    finish_interrupted_write(folder)
    provenance = Provenance.from_dict(dl.read_config(folder).get(dl.EXTRA_SECTION), str(Path(folder) / dl.CONFIG_FILE))
    return provenance.threshold_method if provenance is not None else None


def _commit(folder: Path, names: list[str]) -> None:
    """Rename the staged files over the live ones, then drop the marker (each step idempotent: a
    repeated commit after another kill finds what is left to do)."""
    try:
        for name in names:
            if (folder / (name + STAGED)).exists():
                os.replace(folder / (name + STAGED), folder / name)
        fsync_dir(folder)
        (folder / COMMIT_FILE).unlink(missing_ok=True)
    except OSError as err:
        raise write_error(folder, err, resume="re-run `workbench threshold` to complete the write") from None
    fsync_dir(folder)


def _remove_staged(folder: Path) -> None:
    """Staged files no marker commits (a write interrupted before its marker): the SAE is as it was."""
    for path in [*folder.glob(f"*{STAGED}"), *folder.glob(f"*{STAGED}.tmp")]:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise write_error(path, err) from None


def render(report: ThresholdReport) -> str:
    """The comparison table, one row per method, next to batch-top-k inference."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [f"{report.folder}: k {report.k}, {report.num_tokens:,} {report.split} tokens in batches of {report.batch_size}",
             f"{'method':<12}{'threshold':>12}{'L0':>10}{'FVE':>10}",
             f"{'batch-top-k':<12}{'-':>12}{report.batch_topk_l0:>10.2f}{report.batch_topk_fve:>10.4f}"]
    for m in report.methods:
        mark = "  <- chosen" if m.method == report.chosen else ""
        lines.append(f"{m.method:<12}{num(m.threshold, '.6g'):>12}{num(m.l0, '.2f'):>10}{num(m.fve, '.4f'):>10}{mark}")
    prev = report.previous
    if report.written:
        lines.append(f"wrote threshold {report.result(report.chosen).threshold:.6g} ({report.chosen}) into {report.folder} "
                     f"(previous {prev['threshold']:.6g}, {prev['method']})")
    if report.split == "all":
        lines.append("note: the SAE's config records no held-out split, so every cache token was used")
    return "\n".join(lines)
