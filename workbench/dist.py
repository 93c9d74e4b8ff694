"""The one distributed module: the process state under `accelerate launch` (or a single plain process),
the two rules every stage follows under it, and the collectives of data-parallel training.

    process_state, resolve_device   which processes there are, and where each one computes
    on_main_first                   work done by the main process alone (a lock, a manifest, a checkpoint)
                                    hands its result, or its failure, to every process
    Collective                      what the batch top-k selection needs across processes (rank, cat)
    Comm                            the training step's collectives (a Collective, plus sum and mean)
    close_process_group             the group destroyed at the end of a command (`workbench.cli.main`)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from workbench.errors import WorkbenchError


def process_state(cpu: bool = False):
    """Accelerate's PartialState, honouring `accelerate launch --cpu`-style CPU runs.

    `Accelerator()` reads ACCELERATE_USE_CPU itself; a bare `PartialState()` does not, and on a machine
    without CUDA it then reports one process even when `accelerate launch` started several.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def close_process_group(ok: bool) -> None:
    """Destroy the process group `accelerate launch` started, while the interpreter is still whole. Left to
    interpreter shutdown, gloo's worker threads can abort the process after its work is done ("terminate called
    without an active exception", exit -6: pytorch/pytorch#190489). After a failure only a gloo group is
    destroyed: destroying an NCCL group waits on the other processes, which may be stuck in a collective
    (pytorch/torchtitan#1342)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return
    if ok or td.get_backend() == "gloo":
        td.destroy_process_group()


def resolve_device(spec: str | None, state, name: str) -> torch.device:
    """The device a setting names (`name`: how the user wrote it, e.g. collect.device or --device), or
    Accelerate's device for this process when it is None; one line for a device that is not there."""
    if spec is None:
        return state.device
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise WorkbenchError(f"{name} '{spec}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == state.device.type and device.index is None:
        return state.device  # e.g. "cuda" under accelerate launch: this process's own GPU
    if state.num_processes > 1:
        raise WorkbenchError(f"{name} '{spec}' names one device for all {state.num_processes} processes; "
                             "leave it unset so that each process uses its own")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"{name} is '{spec}' but CUDA is not available here; use cpu or leave it unset")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise WorkbenchError(f"{name} is '{spec}' but this machine has {torch.cuda.device_count()} GPU(s); "
                             "use another index or leave it unset")
    if device.type not in ("cpu", "cuda"):
        try:  # a one-element round trip: torch raises a different error type for each missing backend
            torch.ones(1, device=device).cpu()
        except Exception as err:
            raise WorkbenchError(f"{name} is '{spec}' but that device is not usable here "
                                 f"({(str(err).splitlines() or [type(err).__name__])[0][:120]}); use cpu or leave it unset") from None
    return device


def on_main_first(state, fn: Callable[[], Any]) -> Any:
    """Run fn on the main process only and hand its result (or its WorkbenchError) to every process,
    so no process waits at a barrier for a main process that failed."""
    if state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box[0] = ("ok", fn())
        except WorkbenchError as err:
            box[0] = ("error", str(err))
    broadcast_object_list(box)
    status, value = box[0]
    if status == "error":
        raise WorkbenchError(value)
    return value


class Collective(Protocol):
    """What the batch top-k selection needs from data parallelism: this process's rank among world_size,
    and `cat`, which concatenates a tensor along dim 0 across processes in rank order."""

    rank: int
    world_size: int

    def cat(self, t: torch.Tensor) -> torch.Tensor: ...


class Comm:
    """The collectives of the data-parallel training step (a Collective), through an Accelerator; one
    process needs none.

    Every process holds an equal share of the global batch. `cat` concatenates along dim 0 across
    processes, `sum` and `mean` reduce elementwise.
    """

    def __init__(self, accelerator: Any = None):
        self.acc = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        self.world_size = 1 if self.acc is None else self.acc.num_processes
        self.rank = 0 if self.acc is None else self.acc.process_index

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.acc is None else self.acc.gather(t.contiguous())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.acc is None else self.acc.reduce(t, reduction="sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.acc is None else self.acc.reduce(t, reduction="mean")

    def batch_mean(self, t_B: torch.Tensor) -> torch.Tensor:
        """Mean over the global batch of a per-token quantity [B, ...] -> [...]."""
        return t_B.mean(0) if self.acc is None else self.mean(t_B.mean(0))

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each parameter's gradient averaged across processes, in one flat all-reduce (every one has a grad)."""
        if self.acc is None:
            return
        flat = self.mean(torch.cat([p.grad.reshape(-1) for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p.grad))
