"""A content digest of every file the demo pipeline writes, to prove that a refactoring changed nothing.

    python bench/demo_digest.py checkpoints/demo > before.json   # on the old code
    python bench/demo_digest.py checkpoints/demo --compare before.json   # on the new code: exit 1 on a difference

Each file is reduced to what it means, so that only fields recording time, paths or speed are ignored:
- HDF5: every dataset's dtype, shape and bytes, and every attribute (the JSON `stats` attribute with its
  timing fields removed);
- JSON / JSONL: the parsed value with timing fields removed and the output root replaced by `<root>`;
- ae.pt / checkpoint.pt: each tensor's dtype, shape and bytes (plus the non-tensor values);
- safetensors: each tensor's dtype, shape and bytes, and the header metadata;
- text (model cards): the text with the output root replaced;
- PNG plots: skipped (matplotlib stamps its version; the plotted numbers are in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from safetensors import safe_open

# Fields that record when or how fast something ran, never what it computed.
VOLATILE = re.compile(r"(^|_)(time|seconds|elapsed|finished|started|created|tokens_per_s|per_s|rate|eta|pid)($|_)")


def _clean(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in sorted(value.items()) if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def _h(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:24]


def _tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype == torch.bfloat16 or t.numel() == 0 else t
    return f"{t.dtype} {tuple(t.shape)} {_h(raw.numpy().tobytes())}"


def _attr(value: Any, root: str) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return _clean(json.loads(value), root)
        except json.JSONDecodeError:
            pass
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return _clean(value, root)


def digest_h5(path: Path, root: str) -> dict:
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as h5:
        def visit(name: str, obj: Any) -> None:
            attrs = {k: _attr(v, root) for k, v in sorted(obj.attrs.items()) if not VOLATILE.search(k)}
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                out[name] = {"dtype": str(obj.dtype), "shape": list(obj.shape), "data": _h(np.ascontiguousarray(data).tobytes()),
                             "attrs": attrs}
            else:
                out[name] = {"attrs": attrs}
        out["/"] = {"attrs": {k: _attr(v, root) for k, v in sorted(h5.attrs.items()) if not VOLATILE.search(k)}}
        h5.visititems(visit)
    return out


def digest_pt(path: Path, root: str) -> Any:
    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return _tensor(v)
        if isinstance(v, dict):
            return {str(k): walk(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0])) if not VOLATILE.search(str(k))}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return _clean(v, root)
    return walk(torch.load(path, map_location="cpu", weights_only=True))


def digest_safetensors(path: Path, root: str) -> dict:
    with safe_open(str(path), "pt") as f:
        return {"metadata": _clean(f.metadata() or {}, root), **{k: _tensor(f.get_tensor(k)) for k in sorted(f.keys())}}


def digest_file(path: Path, root: str) -> Any:
    suffix = path.suffix
    if suffix == ".h5":
        return digest_h5(path, root)
    if suffix == ".pt":
        return digest_pt(path, root)
    if suffix == ".safetensors":
        return digest_safetensors(path, root)
    if suffix == ".json":
        return _clean(json.loads(path.read_text()), root)
    if suffix == ".jsonl":
        return [_clean(json.loads(line), root) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".png":
        return "skipped"
    return _h(path.read_text().replace(root, "<root>").encode())


def digest(root: Path) -> dict[str, Any]:
    """Every file under root (locks and temporary files aside), keyed by its path relative to root."""
    text_root = str(root.resolve())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp"))
    return {str(p.relative_to(root)): digest_file(p, text_root) for p in files}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}/{key}" if prefix else key
        if key not in old:
            out.append(f"only in new: {where}")
        elif key not in new:
            out.append(f"only in old: {where}")
        elif isinstance(old[key], dict) and isinstance(new[key], dict):
            out.extend(differences(old[key], new[key], where))
        elif old[key] != new[key]:
            out.append(f"differs: {where}: {json.dumps(old[key])[:120]} -> {json.dumps(new[key])[:120]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the demo's output directory (checkpoints/demo)")
    ap.add_argument("--compare", type=Path, help="a digest written earlier: print the differences, exit 1 if any")
    args = ap.parse_args()
    new = digest(args.root)
    if args.compare is None:
        json.dump(new, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    diff = differences(json.loads(args.compare.read_text()), new)
    print("\n".join(diff) if diff else f"identical: {len(new)} files")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
