"""Which processes a run has: one, or several launched by torchrun / accelerate launch."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
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


class PeerTimeout(RuntimeError):
    """A collective waited `train.process_timeout` for a peer; the message names the stalled one."""


_KEY = "accelvit/at/{}"


def report_position(position: int, label: str) -> None:
    """Leave where this process is in the rendezvous store, so that a peer's timeout can name it.

    `position` orders the points a process passes (set-up phases negative, steps from 0): on a timeout
    the process furthest behind is the one the others waited for.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        store = dist.distributed_c10d._get_default_store()
        store.set(_KEY.format(dist.get_rank()), f"{position} {time.time():.3f} {label}")


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective that gave up waiting for a peer (gloo and NCCL word it variously)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timeout" in text or "timed out" in text)


def stalled_message(timeout_s: float) -> str:
    """One line naming the process(es) furthest behind, from the positions left in the store."""
    store = dist.distributed_c10d._get_default_store()
    now, seen = time.time(), {}
    for rank in range(dist.get_world_size()):
        key = _KEY.format(rank)
        if store.check([key]):
            position, stamp, label = store.get(key).decode().split(" ", 2)
            seen[rank] = (int(position), now - float(stamp), label)
    waited = f"a peer process did not answer within train.process_timeout={timeout_s:g} s"
    missing = [r for r in range(dist.get_world_size()) if r not in seen]
    if missing:
        return f"{waited}: process {', '.join(map(str, missing))} never reported where it was"
    last = min(p for p, _, _ in seen.values())
    behind = [r for r, (p, _, _) in seen.items() if p == last]
    if len(behind) == len(seen):
        return f"{waited}; every process last reported {seen[0][2]}, so which one stalled is not known"
    stalled = ", ".join(
        f"process {r} was at {seen[r][2]} (last heard from {seen[r][1]:.0f} s ago)" for r in behind
    )
    ahead = seen[next(r for r in seen if r not in behind)][2]
    return f"{waited}: {stalled}; the others were at {ahead}"
