"""`workbench verify DIR`: every SAE folder under DIR, run by its format's reference library in a separate
process, against the workbench's own module on the same inputs.

For each SAE: encode(x), decode(f) (f = the workbench's latents, so both decoders see the same input)
and forward(x) on random activations built from the SAE's own decoder and, with a cache, on real
activations of the SAE's layer. The reference is dictionary_learning's `load_dictionary` for an
`ae.pt` folder and `sae_lens.SAE.load_from_disk` for a SAELens folder, each library in one subprocess
for all its SAEs (importing either patches or loads far too much for the workbench's own process).

The two sides are different code (another library; nn.Linear against a matmul plus bias; the same ops on
another torch build or CPU), so they agree to fp32 rounding, not bit for bit. Rounding scales with the
magnitude of the terms a product sums, not with its result (a pre-activation near zero can be the sum of
large terms that cancel): an entry is a mismatch when its difference exceeds `tolerance` (1e-5) times
sum_i |x'_i W_enc[i, f]| + |b_enc[f]| for encode, sum_f |f_f W_dec[f, d]| + |b_dec[d]| for decode, and for
forward that decode sum with encode's own on the latents that fire (encode's rounding reaches the
decoder). Two summation orders of such products differ by up to 4.1e-7 of that magnitude (measured for D
from 16 to 8192 on raw-scale activations: nn.Linear against a matmul plus bias, 1 against 2 threads, other
batch sizes), so 1e-5 leaves a 25x margin; relative to the largest output they differ by up to 4e-6.

A latent on in one code and off in the other, whose value lies within that tolerance of the activation's
cut (the JumpReLU threshold; for a top-k, the smallest value kept in that row), is a pre-activation on the
cut that rounding put on either side: it is counted, left out of the encode comparison, and its token left
out of the forward one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import detect_format, find_sae_folders, load_sae, read_weights
from workbench.formats.weights import InferenceSAE
from workbench.hub import resolve_sae_path

LIBRARY_OF = {"dictionary_learning": "dictionary_learning", "saelens": "sae_lens"}
OUTPUTS = ("encode", "decode", "forward")


@dataclass
class Check:
    """The verdict on one SAE folder: max abs differences per output and input set, or an error."""

    folder: Path
    fmt: str
    kind: str = "?"
    diffs: dict[str, float] = field(default_factory=dict)  # "encode/random" -> max abs diff
    exceeded: list[str] = field(default_factory=list)  # "decode/random": some entry beyond the tolerance
    flips: int = 0  # latents on their cut that fired on one side only (left out, see the module docstring)
    tolerance: float = 1e-5
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.exceeded


def verify(root: str | Path, cache: str | Path | None = None, num_random: int = 256, num_cache: int = 256,
           tolerance: float = 1e-5, seed: int = 0) -> list[Check]:
    """Compare every SAE under root with its reference library; see the module docstring."""
    root = resolve_sae_path(root)  # a local folder or an hf:// reference
    # complete=False: a folder with weights but a missing config is reported as a failed check, not skipped
    checks = [Check(folder=folder, fmt="?", tolerance=tolerance) for folder in find_sae_folders(root, complete=False)]
    ours: dict[int, dict[str, torch.Tensor]] = {}
    allowed: dict[int, dict[str, torch.Tensor]] = {}
    cuts: dict[int, tuple[str, torch.Tensor | None]] = {}
    inputs: dict[int, dict[str, torch.Tensor]] = {}
    for i, check in enumerate(checks):
        try:
            check.fmt = detect_format(check.folder)
            module, layer, check.kind = _workbench_module(check.folder)
            x = _inputs(module, layer, cache, num_random, num_cache, seed + i)
            with torch.no_grad():
                f = module.encode(x)
                ours[i] = {"encode": f, "decode": module.decode(f), "forward": module(x)}
                allowed[i] = {name: tolerance * m for name, m in _magnitudes(module, x, f).items()}
            cuts[i] = (getattr(module, "activation", "jumprelu"), getattr(module, "threshold", None))
            inputs[i] = {"x": x, "f": f}
        except WorkbenchError as err:
            check.error = str(err)
    for fmt in LIBRARY_OF:
        todo = [i for i in inputs if checks[i].fmt == fmt]
        if todo:
            results = run_reference(fmt, [checks[i].folder for i in todo], [inputs[i] for i in todo])
            for i, ref in zip(todo, results, strict=True):
                _compare(checks[i], ours[i], ref, allowed[i], cuts[i], num_random)
    return checks


def run_reference(fmt: str, folders: list[Path], inputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor] | str]:
    """encode(x), decode(f) and forward(x) of each folder, as the reference library of `fmt` loads and
    runs it, on inputs {x [N, D], f [N, F]}: one separate process for all of them. A string where the
    library failed on that folder."""
    with tempfile.TemporaryDirectory(prefix="workbench-verify-") as tmp:
        jobs = []
        for j, (folder, tensors) in enumerate(zip(folders, inputs, strict=True)):
            job = {"folder": str(folder), "inputs": f"{tmp}/in_{j}.safetensors", "outputs": f"{tmp}/out_{j}.safetensors"}
            save_file({k: v.contiguous() for k, v in tensors.items()}, job["inputs"])
            jobs.append(job)
        jobs_path = Path(tmp) / "jobs.json"
        jobs_path.write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "workbench.verify_reference", fmt, str(jobs_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        failed = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        results: list[dict[str, torch.Tensor] | str] = []
        for job in jobs:
            error_file = Path(job["outputs"] + ".error")
            if failed is not None:
                results.append(f"{LIBRARY_OF[fmt]} process failed: {failed}")
            elif error_file.is_file():
                results.append(f"{LIBRARY_OF[fmt]}: {error_file.read_text()}")
            elif not Path(job["outputs"]).is_file():
                results.append(f"{LIBRARY_OF[fmt]} wrote no outputs")
            else:
                results.append(load_file(job["outputs"]))
        return results


def _workbench_module(folder: Path) -> tuple[torch.nn.Module, int | None, str]:
    """The workbench module for a folder, its layer (for cache inputs) and a name for its kind."""
    weights = read_weights(folder)
    if detect_format(folder) == "dictionary_learning":
        kind = dl.read_config(folder)["trainer"]["dict_class"]
    else:
        kind = saelens.read_cfg(folder).get("architecture", "standard")
    return load_sae(folder), weights.info.layer, kind


def _inputs(module: torch.nn.Module, layer: int | None, cache: str | Path | None, num_random: int,
            num_cache: int, seed: int) -> torch.Tensor:
    """x [N, D]: random activations that switch latents on (b_dec plus a few decoder directions with
    magnitudes around the threshold, plus noise), then real ones from the cache."""
    W_dec_FD = module.W_dec_FD if hasattr(module, "W_dec_FD") else module.W_dec
    b_dec_D = module.b_dec
    F, D = W_dec_FD.shape
    gen = torch.Generator().manual_seed(seed)
    threshold = getattr(module, "threshold", None)
    finite = threshold[torch.isfinite(threshold)] if threshold is not None else torch.zeros(0)
    scale = max(float(finite.max()), 0.0) + 1.0 if finite.numel() else 1.0
    per_token = min(F, 16)
    codes_NF = torch.zeros(num_random, F)
    idx = torch.stack([torch.randperm(F, generator=gen)[:per_token] for _ in range(num_random)])
    codes_NF.scatter_(1, idx, scale * 2 * torch.rand(num_random, per_token, generator=gen))
    with torch.no_grad():
        x = b_dec_D + codes_NF @ W_dec_FD.float() + 0.1 * scale * torch.randn(num_random, D, generator=gen)
    parts = [x.float()]
    if cache is not None:
        parts.append(_cache_inputs(cache, layer, D, num_cache, seed))
    return torch.cat(parts)


def _cache_inputs(cache: str | Path, layer: int | None, d_model: int, n: int, seed: int) -> torch.Tensor:
    from workbench.cache import ActivationCache

    with ActivationCache(cache) as c:
        if layer is None:
            raise WorkbenchError(f"the SAE records no layer, so {cache} cannot supply its activations; verify without --cache")
        if c.d_model != d_model:
            raise WorkbenchError(f"the cache {cache} has d_model {c.d_model} but the SAE expects {d_model}")
        for batch in c.batches(layer, n, shuffle=True, seed=seed, split="all", drop_last=False):
            return batch.float()
    raise WorkbenchError(f"the cache {cache} has no tokens for layer {layer}")


def _magnitudes(module: torch.nn.Module, x_ND: torch.Tensor, f_NF: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per output entry, the sum of the absolute values of the terms its product adds up (see the module
    docstring): encode [N, F], decode and forward [N, D], for the workbench's module, inputs x and its code f."""
    if isinstance(module, InferenceSAE):
        W_enc_DF, b_enc_F, W_dec_FD = module.W_enc, module.b_enc, module.W_dec
        shift, rescale = module.apply_b_dec_to_input, module.rescale_acts_by_decoder_norm
    else:  # BatchTopKSAE, MatryoshkaBatchTopKSAE
        W_enc_DF, b_enc_F, W_dec_FD, shift, rescale = module.W_enc_DF, module.b_enc_F, module.W_dec_FD, True, False
    norms_F = W_dec_FD.norm(dim=1) if rescale else torch.ones(W_dec_FD.shape[0])
    encode_NF = ((x_ND - module.b_dec * shift).abs() @ W_enc_DF.abs() + b_enc_F.abs()) * norms_F
    W_dec_abs_FD = W_dec_FD.abs()

    def decode(m_NF: torch.Tensor) -> torch.Tensor:
        return (m_NF / norms_F) @ W_dec_abs_FD + module.b_dec.abs()

    return {"encode": encode_NF, "decode": decode(f_NF.abs()),
            "forward": decode(f_NF.abs() + encode_NF * (f_NF != 0))}


def _flips(activation: str, threshold: torch.Tensor | None, ours_NF: torch.Tensor, ref_NF: torch.Tensor,
           allowed_NF: torch.Tensor) -> torch.Tensor:
    """[N, F]: latents on in one code and off in the other whose value lies within `allowed` of the cut,
    the JumpReLU threshold or, for a top-k, the smallest value the same side kept in that row (a swap at
    the cut, so as many latents gained as lost in the row). A relu has no cut: such values are within
    `allowed` already."""
    one_sided_NF = ((ours_NF == 0) != (ref_NF == 0)) & ((ours_NF - ref_NF).abs() > allowed_NF)
    value_NF = ours_NF + ref_NF  # one of the two is 0
    if activation == "jumprelu":
        return one_sided_NF & (value_NF - threshold <= allowed_NF)
    if activation == "topk":
        def smallest_kept(f_NF: torch.Tensor) -> torch.Tensor:
            return torch.where(f_NF != 0, f_NF, torch.inf).amin(dim=1, keepdim=True)

        at_cut_NF = (value_NF - torch.where(ours_NF != 0, smallest_kept(ours_NF), smallest_kept(ref_NF))).abs() <= allowed_NF
        gained_N, lost_N = (one_sided_NF & (ours_NF != 0)).sum(1), (one_sided_NF & (ref_NF != 0)).sum(1)
        return one_sided_NF & at_cut_NF & (gained_N == lost_N)[:, None]
    return torch.zeros_like(one_sided_NF)


def _compare(check: Check, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | str,
             allowed: dict[str, torch.Tensor], cut: tuple[str, torch.Tensor | None], num_random: int) -> None:
    """Fill check.diffs, check.exceeded and check.flips from our outputs, the reference's and the allowed
    difference per entry (tolerance times _magnitudes); `cut` is (activation, threshold) of our module."""
    if isinstance(ref, str):
        check.error = ref
        return
    for name in OUTPUTS:
        if ref[name].shape != ours[name].shape:
            check.error = f"{name}: reference shape {list(ref[name].shape)} vs workbench {list(ours[name].shape)}"
            return
    for subset, rows in (("random", slice(0, num_random)), ("cache", slice(num_random, None))):
        if ref["encode"][rows].shape[0] == 0:
            continue
        flips_NF = _flips(*cut, ours["encode"][rows].float(), ref["encode"][rows], allowed["encode"][rows])
        check.flips += int(flips_NF.sum())
        left_out = {"encode": flips_NF, "decode": torch.zeros(()).bool(), "forward": flips_NF.any(dim=1, keepdim=True)}
        for name in OUTPUTS:
            diff = (ref[name][rows] - ours[name][rows].float()).abs()
            within = (diff <= allowed[name][rows]) | left_out[name]
            check.diffs[f"{name}/{subset}"] = float(diff.masked_fill(left_out[name], 0).max())
            if not bool(within.all()):
                check.exceeded.append(f"{name}/{subset}")


def format_report(checks: list[Check], root: str | Path) -> str:
    """One line per SAE: verdict, folder, format and class, max abs diff per output (worst input set)."""
    lines = []
    for c in checks:
        where = c.folder.relative_to(root) if c.folder != Path(root) and c.folder.is_relative_to(root) else c.folder
        head = f"{'OK  ' if c.ok else 'FAIL'} {where}  [{LIBRARY_OF.get(c.fmt, c.fmt)} {c.kind}]"
        if c.error:
            lines.append(f"{head}  error: {c.error}")
            continue
        diffs = "  ".join(f"{name} {max(v for k, v in c.diffs.items() if k.startswith(name + '/')):.1e}" for name in OUTPUTS)
        sets = "random+cache" if any(k.endswith("/cache") for k in c.diffs) else "random"
        flips = f"; {c.flips} latents on their threshold fired on one side only (rounding), left out" if c.flips else ""
        bad = f"  exceeds tolerance {c.tolerance:g}: {', '.join(c.exceeded)}" if c.exceeded else ""
        lines.append(f"{head}  max abs diff: {diffs} ({sets}){flips}{bad}")
    n_bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - n_bad} of {len(checks)} SAEs match their reference library"
                 + (f"; {n_bad} do not" if n_bad else ""))
    return "\n".join(lines)
