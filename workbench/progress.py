"""Progress that reads well both on a terminal and in a log file.

On a terminal (stderr is a TTY) `progress()` is a tqdm bar, as before. Anywhere else (a scheduler's log
file, a pipe) a bar's carriage returns turn into one line of tens of thousands of characters, so it is
a plain line every WORKBENCH_PROGRESS_EVERY seconds (default 30; `workbench --progress-every`
sets it) and one when it ends, each at most MAX_LINE characters:

    collect: 48.0k/131k tok (37%), 9.41k tok/s, elapsed 0:00:05, ETA 0:00:09
    layer 2: 700/2048 step (34%), 61.2 step/s, elapsed 0:00:11, ETA 0:00:22 | loss=0.0123 L0=16.0 FVE=0.912

The interval is an environment variable so that it reaches every process of `accelerate launch` and
every command (collect, train, run) without a recipe key.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from workbench.errors import WorkbenchError

ENV = "WORKBENCH_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0
MAX_LINE = 300


def interval() -> float:
    """Seconds between plain progress lines: WORKBENCH_PROGRESS_EVERY, or 30."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_EVERY
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise WorkbenchError(f"{ENV}={text!r} is not a number of seconds above 0; set it to e.g. 30, or unset it")
    return value


def quiet_library_bars() -> None:
    """Off a terminal, also turn off the bars of huggingface_hub and transformers (loading and saving
    weights): they would write carriage returns into the log. Must run before they are imported."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str, initial: int = 0,
             disable: bool = False, unit_scale: bool = False, leave: bool = True):
    """A tqdm bar on a terminal, a PlainProgress otherwise; both take update(n), set_postfix(**values),
    close(), and iterate over `iterable` when given one."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    unit_scale=unit_scale, leave=leave, dynamic_ncols=True, mininterval=1.0)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                         unit_scale=unit_scale, every=interval())


class PlainProgress:
    """Progress as a plain line (no carriage return) at most every `every` seconds, and one at close."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
                 initial: int = 0, disable: bool = False, unit_scale: bool = False, every: float = DEFAULT_EVERY,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.start_n = initial
        self.disable, self.every, self.clock = disable, every, clock
        self.stream = stream
        self.postfix = ""
        self.started = self.last = clock()
        self.printed_n: int | None = None
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self.last >= self.every:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.printed_n != self.n:
            self._emit()

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = self._number(self.n)
        if self.total:
            parts = [f"{self.desc}: {done}/{self._number(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"]
        else:
            parts = [f"{self.desc}: {done} {self.unit}"]
        parts.append(f"{self._number(rate)} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        text = ", ".join(parts) + (f" | {self.postfix}" if self.postfix else "")
        text = " ".join(text.split())  # a newline or carriage return in a postfix value must not break the line
        return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."

    def _emit(self) -> None:
        stream = self.stream or sys.stderr
        print(self.line(), file=stream, flush=True)
        self.last, self.printed_n = self.clock(), self.n

    def _number(self, value: float) -> str:
        if not self.unit_scale:
            return f"{value:.1f}" if value != int(value) else str(int(value))
        for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.3g}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
