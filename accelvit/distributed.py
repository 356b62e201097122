"""Which processes a run has: one, or several launched by torchrun / accelerate launch."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def use_cpu() -> bool:
    """CPU when asked (ACCELERATE_USE_CPU=1), or when several processes run on a machine without CUDA.

    Without the second rule, torchrun on a CPU-only machine would start independent processes that
    each believe they are the only one.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())


def any_process(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any of them."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "max").item())


def process_state(timeout_s: float | None = None) -> PartialState:
    """accelerate's process group (gloo on CPU), created once and shared with the Accelerator.

    `timeout_s` (the first call's counts): how long a collective waits for a peer before failing.
    """
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return PartialState(cpu=use_cpu(), **kwargs)
