"""Progress off a terminal (workbench.progress): plain lines at the configured interval, with done/total, rate,
ETA and the training metrics, no carriage returns and no line over 300 characters."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.progress import ENV, MAX_LINE, PlainProgress, interval

REPO = Path(__file__).resolve().parents[1]
# recipes/demo.yaml made small: 128 rows collected, 80 steps of 256 tokens on one layer.
SMALL = [
    "data.num_tokens=16384", "train.batch_size=256", "train.num_tokens=20480", "train.warmup_steps=20",
    "train.threshold_start_step=20", "train.eval_tokens=2048", "train.checkpoint_every=25", "train.layers=[2]",
    "features.out=null",
]
EVERY = 0.2
PROGRESS = re.compile(r"^(collect|layer 2): (\S+)/(\S+) (tok|step) \(\d+%\), \S+ (tok|step)/s, elapsed \d+:\d\d:\d\d")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_at_most_once_an_interval_and_once_at_close():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=100, desc="layer 2", unit="step", every=30, clock=clock, stream=out)
    for _ in range(10):  # 10 steps of 7 s: a line at the first step 30 s after the last (35 s, 70 s)
        clock.now += 7
        bar.update(1)
    assert out.getvalue().splitlines() == [
        "layer 2: 5/100 step (5%), 0.1 step/s, elapsed 0:00:35, ETA 0:11:05",  # 95 steps of 7 s,
        "layer 2: 10/100 step (10%), 0.1 step/s, elapsed 0:01:10, ETA 0:10:30",
    ]
    bar.set_postfix(loss="0.25", L0="16.0")
    clock.now += 1
    bar.update(2)  # 1 s after the last line: none
    bar.close()
    bar.close()  # once
    last = out.getvalue().splitlines()[2:]
    # ETA: 88 steps left at 12 steps in 71 s
    assert last == ["layer 2: 12/100 step (12%), 0.2 step/s, elapsed 0:01:11, ETA 0:08:40 | loss=0.25 L0=16.0"]


def test_a_line_is_one_line_of_at_most_300_characters():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=10**9, desc="collect", unit="tok", unit_scale=True, every=1, clock=clock, stream=out)
    bar.set_postfix(note="x\ry\n" + "z" * 400)
    clock.now += 2
    bar.update(123_456_789)
    bar.close()
    line = out.getvalue()
    assert line.count("\n") == 1 and "\r" not in line and len(line.rstrip("\n")) == MAX_LINE
    assert line.startswith("collect: 123M/1G tok (12%), 61.7M tok/s, elapsed 0:00:02, ETA 0:00:14 | note=x y ")


def test_a_disabled_bar_writes_nothing():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(range(3), desc="verify", unit="shard", disable=True, every=0, clock=clock, stream=out)
    assert list(bar) == [0, 1, 2] and out.getvalue() == ""


def test_the_interval_setting_is_checked(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "2.5")
    assert interval() == 2.5
    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(WorkbenchError, match="WORKBENCH_PROGRESS_EVERY='soon' is not a number of seconds"):
        interval()
    assert main(["plan", "recipes/demo.yaml", "--progress-every", "0"]) == 2
    err = capsys.readouterr().err
    assert "--progress-every: must be above 0 seconds" in err and err.count("\n") == 1


def test_a_run_logged_to_a_file_has_plain_progress_lines_at_the_interval(tmp_path):
    log = tmp_path / "log"
    args = [sys.executable, "-m", "workbench", "run", "recipes/demo.yaml", "--progress-every", str(EVERY),
            "--stages", "collect,train", *SMALL, f"collect.out={tmp_path}/cache", f"train.out={tmp_path}/saes"]
    arrived: list[tuple[float, str]] = []  # each line and when the file first held it (polled)
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=fh,
                                stderr=subprocess.STDOUT)
        seen = 0
        while True:
            done = proc.poll() is not None
            lines = log.read_bytes().split(b"\n")[:-1]  # complete lines
            arrived += [(time.monotonic(), line.decode()) for line in lines[seen:]]
            seen = len(lines)
            if done:
                break
            time.sleep(0.01)
    text = log.read_bytes()
    assert proc.returncode == 0, text[-3000:]
    assert b"\r" not in text
    assert max(len(line) for line in text.decode().splitlines()) <= MAX_LINE
    progress = [(t, PROGRESS.match(line), line) for t, line in arrived if PROGRESS.match(line)]
    collect = [m for _, m, _ in progress if m[1] == "collect"]
    train = [(t, m, line) for t, m, line in progress if m[1] == "layer 2"]
    assert collect and collect[-1][2] == collect[-1][3] == "16.4k"  # every token, of all of them
    assert len(train) >= 3 and train[-1][1][2] == train[-1][1][3] == "80"
    steps = [int(m[2]) for _, m, _ in train]
    assert steps == sorted(steps) and all(int(m[3]) == 80 for _, m, _ in train)
    for _, _, line in train:
        assert re.search(r"\| loss=\S+ L0=\S+ FVE=\S+ dead=0\.\d{3} tok_s=\S+$", line), line
    assert all(", ETA " in line for _, m, line in train[:-1] if int(m[2]) < 80)
    # A line at most every EVERY seconds; the file is polled every 10 ms, hence the slack.
    gaps = [b[0] - a[0] for a, b in zip(train, train[1:], strict=False)]
    assert min(gaps[:-1]) > EVERY - 0.05, gaps  # the last line is the close(), written when the bar ends
