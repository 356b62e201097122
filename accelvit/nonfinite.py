"""Steps whose loss or gradients are not finite, decided on the device so no step waits for the host.

Reading a step's loss on the host (`.item()`, `bool(tensor)`) makes the host wait until the device
has finished that step before it can queue the next one; on a GPU whose compressed step takes a
few milliseconds that wait is a large share of the step. So a step that is not finite on some
process changes nothing without the host deciding it: fused AdamW skips the update (its
`found_inf`), the momentum encoder keeps its weights (momentum 1), and the buffers the forward
touched are put back (`torch.where`). Once the run must stop (`train.on_nonfinite: stop`, or
`train.max_skipped` skips in a row) every later step is a no-op as well, so whenever the host
learns of it the model still holds the last good state.

The host reads the flags of the steps queued so far (`Guard.settle`) one step late, while the
device runs the next one, and all of them at log, checkpoint and evaluation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Pending:
    """A step queued but not yet read on the host."""

    flags: torch.Tensor  # [not finite, halted, stop requested] on the device, equal on every process
    loss: torch.Tensor
    grad_norm: torch.Tensor
    before: tuple[int, int, float]  # the state's (step, images_seen, budget_spent) before the step


class Guard:
    """The device side (skips in a row, halted) and the steps the host has not read yet."""

    def __init__(self, device: torch.device, policy: str, max_skipped: int, skipped_in_row: int = 0) -> None:
        self.limit = 1 if policy == "stop" else max_skipped
        self.in_row = torch.tensor(skipped_in_row, device=device)
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.pending: list[Pending] = []
        self.stop_requested = False  # a stop (signal) some process asked for, as the host has read it

    def admit(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether this step may change the model: finite (on every process) and not halted."""
        ok = finite & ~self.halted
        self.in_row = torch.where(finite, 0, self.in_row + 1)
        self.halted = self.halted | (self.in_row >= self.limit)
        return ok

    def record(self, loss, grad_norm, before: tuple[int, int, float], stop: torch.Tensor) -> None:
        """Queue the step just admitted; `stop`: a device flag, any process's stop request."""
        flags = torch.stack([self.in_row > 0, self.halted, stop.bool()])
        self.pending.append(Pending(flags, loss.detach(), grad_norm.detach(), before))

    def settle(self, state, keep: int = 0) -> Pending | None:
        """Count the skips of all pending steps but the last `keep` into `state` (one host read).

        Returns the step the run must stop at, if one is among them; `state`'s counters are then
        put back to what they were before it (the device did nothing from that step on)."""
        cut = len(self.pending) - keep
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        if not ready:
            return None
        flags = torch.stack([p.flags for p in ready]).tolist()
        for step, (bad, halted, stop) in zip(ready, flags, strict=True):
            self.stop_requested |= bool(stop)
            if halted:
                state.step, state.images_seen, state.budget_spent = step.before
                self.pending = []
                return step
            state.skipped_in_row = state.skipped_in_row + 1 if bad else 0
            state.skipped += bool(bad)
        return None


def optimizer_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """`optimizer.step()` where `ok` (a device bool). Fused AdamW skips on the device; an optimizer
    that cannot (one resumed from a checkpoint made before accelvit fused it) asks the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not all(group.get("fused") for group in inner.param_groups):
        if bool(ok):
            optimizer.step()
        return
    inner.found_inf = (~ok).float()
    try:
        optimizer.step()  # fp16: the loss scaler sets (and removes) found_inf itself
    finally:
        inner.__dict__.pop("found_inf", None)
