"""The process state under `accelerate launch` (or a single plain process)."""

from __future__ import annotations


def process_state(cpu: bool = False):
    """Accelerate's PartialState, honouring `accelerate launch --cpu`-style CPU runs.

    `Accelerator()` reads ACCELERATE_USE_CPU itself; a bare `PartialState()` does not, and on a machine
    without CUDA it then reports one process even when `accelerate launch` started several.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
