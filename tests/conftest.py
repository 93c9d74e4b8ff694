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


@pytest.fixture(params=["cpu_kernels", "torch_ops"])
def selection_path(request, monkeypatch) -> str:
    """A selection test run on both routes a CPU tensor can take: the CPU kernels (workbench.sae.kernels)
    and torch's operations (the route of every other device)."""
    from workbench.sae import sparse

    monkeypatch.setattr(sparse, "CPU_KERNELS", request.param == "cpu_kernels")
    return request.param


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


# ---- comparing floats that two computations produced ----------------------------------------------
# torch.equal is for results identical by construction: the same code on the same shapes, dtype and thread
# count, or tensors that are copies. Anything else (another library, nn.Linear's fused addmm against a matmul
# plus add, another number of rows in the product, another forward invocation) rounds differently, and
# whether torch's kernels happen to round two such paths alike changes from one torch version to the next.

FP32_TOL = 1e-5
"""Tolerance for fp32 SAE products in these tests, relative to the output's scale max(1, max |expected|).
Their products sum D <= 64 terms of unit-scale or raw-scale (norm ~170) activations: any summation order
rounds them within 3.2e-7 of that scale (measured over nn.Linear, matmul + add and addmm, a transposed
weight, 1 and 2 threads, other row counts, and the folds of a conversion), so 1e-5 leaves a 30x margin; a
real error (a missing bias, a wrong fold, a 0.1% change of a weight) is 1e-3 of the scale or more."""


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|) (see FP32_TOL)."""
    diff = float((actual - expected).abs().max()) if expected.numel() else 0.0
    allowed = tol * max(1.0, float(expected.abs().max()) if expected.numel() else 0.0)
    assert diff <= allowed, f"{what}: max |diff| {diff:.3g} > {allowed:.3g}"


def smallest_kept(f_NF: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The smallest nonzero value of a code: over the whole batch (dim None, batch top-k's cut) or per row."""
    masked = torch.where(f_NF != 0, f_NF, torch.inf)
    return masked.min() if dim is None else masked.amin(dim=dim, keepdim=True)


def cut_of(module: torch.nn.Module, f_NF: torch.Tensor) -> torch.Tensor:
    """Where `module`'s activation switches a latent on, for a code f_NF of it: the JumpReLU threshold
    (workbench BatchTopK and Matryoshka modules, InferenceSAE "jumprelu"); each row's smallest kept value
    for a per-token top-k; 0 for a relu, which has no jump."""
    activation = getattr(module, "activation", "jumprelu")
    if activation == "topk":
        return smallest_kept(f_NF, dim=1)
    return torch.tensor(0.0) if activation == "relu" else module.threshold


def assert_codes_close(actual_NF: torch.Tensor, expected_NF: torch.Tensor, cut: torch.Tensor | float,
                       tol: float = FP32_TOL, max_flips: int = 2, what: str = "") -> torch.Tensor:
    """Two SAE codes of the same inputs from computations that round differently: within tol of the scale
    (as assert_close_to_scale) at every latent, except latents on in one code and off in the other whose
    value lies within that tolerance of `cut` (cut_of: the threshold, or the top-k's smallest kept value, of
    `expected`): a pre-activation on the cut, where the last bit of rounding picks the side. At most
    max_flips of those, so a wrong rule (which flips latents far from the cut, or many) cannot hide among
    them. Returns the rows [N] that hold a flip: their reconstructions differ by the flipped latent."""
    allowed = tol * max(1.0, float(expected_NF.abs().max()))
    diff_NF = (actual_NF - expected_NF).abs()
    flips_NF = ((actual_NF == 0) != (expected_NF == 0)) & (diff_NF > allowed)
    flips_NF &= (actual_NF + expected_NF - cut).abs() <= allowed  # one of the two is 0: the value that fired
    assert int(flips_NF.sum()) <= max_flips, f"{what}: {int(flips_NF.sum())} latents flip at the cut"
    worst = float(diff_NF[~flips_NF].max()) if (~flips_NF).any() else 0.0
    assert worst <= allowed, f"{what}: max |diff| {worst:.3g} > {allowed:.3g} away from the cut"
    return flips_NF.any(dim=1)
