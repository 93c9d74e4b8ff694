"""`workbench verify DIR`: every SAE folder under DIR, run by its format's reference library in a separate
process, against the workbench's own module on the same inputs.

For each SAE: encode(x), decode(f) (f = the workbench's latents, so both decoders see the same input)
and forward(x) on random activations built from the SAE's own decoder and, with a cache, on real
activations of the SAE's layer. The reference is dictionary_learning's `load_dictionary` for an
`ae.pt` folder and `sae_lens.SAE.load_from_disk` for a SAELens folder, each library in one subprocess
for all its SAEs (importing either patches or loads far too much for the workbench's own process).

A difference counts as a mismatch when it exceeds `tolerance` (1e-5, fp32) times max(1, the largest
absolute reference output): absolute for unit-scale activations, relative for raw residual streams
with norms in the hundreds.
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

LIBRARY_OF = {"dictionary_learning": "dictionary_learning", "saelens": "sae_lens"}
OUTPUTS = ("encode", "decode", "forward")


@dataclass
class Check:
    """The verdict on one SAE folder: max abs differences per output and input set, or an error."""

    folder: Path
    fmt: str
    kind: str = "?"
    diffs: dict[str, float] = field(default_factory=dict)  # "encode/random" -> max abs diff
    scales: dict[str, float] = field(default_factory=dict)  # "encode/random" -> max |reference output|
    tolerance: float = 1e-5
    error: str | None = None

    def failures(self) -> list[str]:
        return [name for name, diff in self.diffs.items()
                if not diff <= self.tolerance * max(1.0, self.scales[name])]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures()


def verify(root: str | Path, cache: str | Path | None = None, num_random: int = 256, num_cache: int = 256,
           tolerance: float = 1e-5, seed: int = 0) -> list[Check]:
    """Compare every SAE under root with its reference library; see the module docstring."""
    # complete=False: a folder with weights but a missing config is reported as a failed check, not skipped
    checks = [Check(folder=folder, fmt="?", tolerance=tolerance) for folder in find_sae_folders(root, complete=False)]
    ours: dict[int, dict[str, torch.Tensor]] = {}
    inputs: dict[int, dict[str, torch.Tensor]] = {}
    for i, check in enumerate(checks):
        try:
            check.fmt = detect_format(check.folder)
            module, layer, check.kind = _workbench_module(check.folder)
            x = _inputs(module, layer, cache, num_random, num_cache, seed + i)
            with torch.no_grad():
                f = module.encode(x)
                ours[i] = {"encode": f, "decode": module.decode(f), "forward": module(x)}
            inputs[i] = {"x": x, "f": f}
        except WorkbenchError as err:
            check.error = str(err)
    for fmt in LIBRARY_OF:
        todo = [i for i in inputs if checks[i].fmt == fmt]
        if todo:
            results = run_reference(fmt, [checks[i].folder for i in todo], [inputs[i] for i in todo])
            for i, ref in zip(todo, results, strict=True):
                _compare(checks[i], ours[i], ref, num_random)
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
        cmd = [sys.executable, "-m", "workbench.reference_scripts.reference_outputs", fmt, str(jobs_path)]
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


def _compare(check: Check, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | str, num_random: int) -> None:
    if isinstance(ref, str):
        check.error = ref
        return
    for subset, rows in (("random", slice(0, num_random)), ("cache", slice(num_random, None))):
        if ref["encode"][rows].shape[0] == 0:
            continue
        for name in OUTPUTS:
            a, b = ref[name][rows], ours[name][rows].float()
            if a.shape != b.shape:
                check.error = f"{name}: reference shape {list(a.shape)} vs workbench {list(b.shape)}"
                return
            check.diffs[f"{name}/{subset}"] = float((a - b).abs().max())
            check.scales[f"{name}/{subset}"] = float(a.abs().max())


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
        bad = c.failures()
        lines.append(f"{head}  max abs diff: {diffs} ({sets})" + (f"  exceeds tolerance {c.tolerance:g}: {', '.join(bad)}" if bad else ""))
    n_bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - n_bad} of {len(checks)} SAEs match their reference library"
                 + (f"; {n_bad} do not" if n_bad else ""))
    return "\n".join(lines)
