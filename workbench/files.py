"""File I/O with one error style: atomic writes, JSON reads, folder locks.

Every file the workbench writes goes through `write_atomic` (or `write_json` / `write_text`): the
content is written to `<name>.tmp` beside the target, flushed and fsync'd, then renamed over it, so a
kill, a full disk or a write error at any moment leaves the previous file (or none) under the final
name, never a truncated one. A failure a user can cause (full disk, file-size limit, read-only
filesystem, a parent that is a file, permissions) becomes one `WorkbenchError` line naming the path
and the fix. `torch.save` reports a full disk as `RuntimeError`, so that is caught too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from workbench.errors import WorkbenchError

_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_error(path: Path, err: BaseException, resume: str | None = None) -> WorkbenchError:
    """One line for a failed write of `path`: what the OS said and how to fix it.

    resume: what re-running does (e.g. "re-run the same command to resume"), appended when given."""
    if isinstance(err, OSError):
        text = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
        code = err.errno
    else:  # torch.save wraps the OS error in a RuntimeError whose text carries it
        text = (str(err).splitlines() or [type(err).__name__])[0][:200]
        code = errno.ENOSPC if "No space left" in text or "file write failed" in text else None
    if code in _SPACE:
        hint = "free disk space (or raise `ulimit -f`)"
    elif code == errno.EROFS:
        hint = "the filesystem is read-only: choose another output directory"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        hint = "a parent of it is a file: choose another output directory"
    else:
        hint = "check that the directory exists and is writable, or choose another output directory"
    tail = f" and {resume}" if resume else ""
    return WorkbenchError(f"cannot write {path}: {text}; {hint}{tail}")


def make_dir(path: Path, resume: str | None = None) -> Path:
    """mkdir -p with the one-line error of `write_error`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err, resume) from None
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any], resume: str | None = None,
                 durable: bool = True) -> None:
    """Write `path` through `write(fh)` on a binary file handle, atomically (see the module docstring).
    durable=False skips the two fsyncs: still never half a file under its name, but a power cut may lose
    it. Only for files a re-run rebuilds cheaply and that are written by the thousand (feature pages)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fh: _Recording | None = None
    try:
        make_dir(path.parent, resume)
        with open(tmp, "wb") as raw:
            fh = _Recording(raw)
            write(fh)
            raw.flush()
            if durable:
                os.fsync(raw.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = fh.error if fh is not None and fh.error is not None else err
        if isinstance(cause, RuntimeError) and not _is_write_failure(cause):
            raise
        raise write_error(path, cause, resume) from None
    if durable:
        fsync_dir(path.parent)


class _Recording:
    """A binary file handle that remembers the OSError its write raised: torch.save replaces it with a
    RuntimeError ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _is_write_failure(err: RuntimeError) -> bool:
    text = str(err)
    return any(s in text for s in ("No space left", "file write failed", "PytorchStreamWriter", "unexpected pos"))


def write_text(path: str | Path, text: str, resume: str | None = None, durable: bool = True) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode()), resume, durable)


def write_json(path: str | Path, data: Any, indent: int = 2, resume: str | None = None) -> None:
    write_text(path, json.dumps(data, indent=indent), resume)


def read_json(path: str | Path, fix: str = "fix or delete it", missing_ok: bool = True) -> Any:
    """The parsed JSON at `path`; None when it does not exist and missing_ok. A file that is not JSON
    (or cannot be read) is one WorkbenchError naming the path and `fix`."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise WorkbenchError(f"{path} does not exist; {fix}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"{path} is not valid JSON ({str(err)[:120]}); {fix}") from None
    except OSError as err:
        raise WorkbenchError(f"cannot read {path}: {err.strerror or err}; {fix}") from None


def read_json_object(path: str | Path, fix: str = "fix or delete it", missing_ok: bool = True) -> dict | None:
    """`read_json` for files that must hold a JSON object (a hand-edited list or number is refused)."""
    data = read_json(path, fix, missing_ok)
    if data is not None and not isinstance(data, dict):
        raise WorkbenchError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.lock` file in it) for one writer at a time.

    A second writer fails at once with one line instead of interleaving with the first. The lock is
    an flock: it is released when the process ends, kill -9 included, so it never needs cleaning up.
    what: the command that holds it, for the message (e.g. "workbench collect")."""
    folder = make_dir(Path(folder))

    def busy(holder: str) -> str:
        return f"{folder} is in use by {holder}; wait for it to finish (or stop it) and run the command again"

    with file_lock(folder / ".lock", what, busy):
        yield


@contextmanager
def file_lock(path: Path, what: str, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), which records `what` (pid added) for whoever
    finds it taken: they fail at once with the one line busy(holder)."""
    try:
        fh = open(path, "a+")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise WorkbenchError(busy(fh.read().strip() or "another process")) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()})")
        fh.flush()
        yield
    finally:
        fh.close()
