"""The output folders of `workbench convert` and `workbench export`: what may be written where.

The rule, so that a folder never mixes two SAEs or two runs and re-running a command still works:

- a missing or empty output folder is written;
- a folder this workbench wrote carries a marker, `.workbench-output.json`, naming the command, its
  source (the resolved path of the SAE folder or training run) and the format, and listing every
  file written. The same command from the same source to the same format rewrites the folder: each
  file is replaced atomically, and a listed file the new output does not write (the old SAE's
  sparsity.safetensors, the folder of an SAE no longer in the run) is deleted;
- any other non-empty folder (the output of another SAE, run or format, or files the workbench did
  not write) is refused with one line: pass a new --out or delete the folder.

The marker is written before the first file, listing the old and the new files, and rewritten after
the last with the new ones only, so a run killed or failed midway (a full disk) is recognised, and
completed, by running the same command again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar

from workbench.errors import WorkbenchError
from workbench.files import read_json, write_json

MARKER = ".workbench-output.json"
T = TypeVar("T")


def write_output(out: Path, source: Path, command: str, fmt: str, files: list[str], write: Callable[[], T]) -> T:
    """Run `write()`, which writes `files` (paths relative to `out`, with /) under `out`, by the rule above.

    source: the folder the output is made from; command: "convert" or "export"; fmt: the format written."""
    identity = {"command": command, "source": str(Path(source).resolve()), "format": fmt}
    old = _claim(out, identity)
    new = sorted(set(files))
    write_json(out / MARKER, {**identity, "complete": False, "files": sorted(set(old) | set(new))})
    result = write()
    for name in sorted(set(old) - set(new)):
        _remove(out, name)
    write_json(out / MARKER, {**identity, "complete": True, "files": new})
    return result


def _claim(out: Path, identity: dict[str, str]) -> list[str]:
    """The files `out` holds from an earlier run of the same output ([] when it is new or empty); a
    WorkbenchError when it holds anything else."""
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file; pass a new --out (a directory)")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    entries = [name for name in entries if name != MARKER + ".tmp"]  # a marker write that was killed
    if not entries:
        return []
    marker = read_json(out / MARKER, fix="delete the folder or pass a new --out")
    if marker is None:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise WorkbenchError(f"--out {out} is not empty and was not written by `workbench {identity['command']}` "
                             f"({shown}); pass a new --out or delete it")
    if not _valid(marker):
        raise WorkbenchError(f"{out / MARKER} is damaged; pass a new --out or delete {out}")
    if {key: marker[key] for key in identity} != identity:
        raise WorkbenchError(f"--out {out} holds the output of `workbench {marker['command']}` from {marker['source']} "
                             f"({marker['format']}), not of this {identity['command']} of {identity['source']} "
                             f"({identity['format']}); pass a new --out or delete it")
    return marker["files"]


def _valid(marker: object) -> bool:
    """A marker this module wrote: its keys, and files that are relative paths inside the folder (so that
    a hand-edited one can never make the clean-up delete anything outside it)."""
    if not isinstance(marker, dict) or not all(isinstance(marker.get(k), str) for k in ("command", "source", "format")):
        return False
    files = marker.get("files")
    return isinstance(files, list) and all(
        isinstance(f, str) and f and not PurePosixPath(f).is_absolute() and ".." not in PurePosixPath(f).parts
        for f in files)


def _remove(out: Path, name: str) -> None:
    """Delete a stale output file (and a temporary file a killed write left beside it), then the folders
    it leaves empty, up to `out`."""
    path = out / name
    for stale in (path, path.with_name(path.name + ".tmp")):
        try:
            stale.unlink(missing_ok=True)
        except OSError as err:
            raise WorkbenchError(f"cannot delete the stale output file {stale}: {err.strerror}; delete it by hand") from None
    parent = path.parent
    while parent != out and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def is_current(out: Path, source: Path, command: str, fmt: str, inputs: list[Path]) -> bool:
    """Whether `out` holds the complete output of this command from `source` in `fmt`, with every file
    its marker lists present, written after each of `inputs` last changed (the pipeline's check: a
    deleted output file, or a source SAE changed since, makes it stale)."""
    identity = {"command": command, "source": str(Path(source).resolve()), "format": fmt}
    try:
        marker = read_json(out / MARKER)
    except WorkbenchError:
        return False  # the command itself says what is wrong
    if not _valid(marker) or not marker.get("complete") or {key: marker[key] for key in identity} != identity:
        return False
    if not all((out / name).is_file() for name in marker["files"]):
        return False
    written = (out / MARKER).stat().st_mtime_ns
    return all(path.stat().st_mtime_ns <= written for path in inputs)
