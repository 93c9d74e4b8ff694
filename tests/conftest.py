"""Shared fixtures: the embedded tiny models are built once per session into a temporary directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def embedded_dir(tmp_path_factory) -> Path:
    """Point embedded:<name> models at a per-session folder (built on first use, seeded)."""
    path = Path(os.environ.get("WORKBENCH_TEST_EMBEDDED_DIR") or tmp_path_factory.mktemp("embedded"))
    os.environ["WORKBENCH_EMBEDDED_DIR"] = str(path)
    return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    test models and SAEs gain nothing from more, and with 2 intra-op threads on a busy 2-core machine the
    thread hand-offs cost 20x the arithmetic (measured: a 300-step fit 1.2 s on 1 thread, 23-53 s on 2 under load)."""
    with torch_threads(1):
        yield


REPO = Path(__file__).resolve().parents[1]


def accelerate_two_cpu_processes(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` prefix and environment that really start 2 CPU processes (gloo).

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its simple
    launcher); the multi-process launcher with ACCELERATE_USE_CPU=1 starts two. No accelerate config
    file is read: HF_HOME is an empty folder and every choice is on the command line.
    """
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "workbench"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    return cmd, env
