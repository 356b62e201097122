"""One training step: forward, backward, and the optimizer step and momentum update when they are safe.

Its own module so that the loop and the lookahead criterion (which trains a few steps per candidate
from a snapshot) take the very same step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from accelvit.nonfinite import Guard, optimizer_step
from accelvit.objectives import buffer_restorer
from accelvit.setting import Setting


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    setting: Setting,
    progress: float,
    clip_grad: float | None,
    precision: str,
    guard: Guard,
    stop_requested: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward, and, when loss and gradients are finite on every process (and `guard` has
    not halted the run), the optimizer step and momentum update; otherwise weights, optimizer state
    and buffers stay as they were. Decided on the device: nothing here waits for the host.
    Returns (loss, gradient norm, ok, whether any process was asked to stop), all on the device."""
    restore_buffers = buffer_restorer(model)
    loss = model(views, setting, progress)
    accelerator.backward(loss)
    norm = grad_norm(accelerator, model, clip_grad)
    accelerator.unwrap_model(model).cancel_gradients(progress)  # after clipping, as DINO's reference
    # fp16: gradient overflow is the loss scaler's business (it skips the step itself)
    finite = torch.isfinite(loss) & (torch.isfinite(norm) | (precision == "fp16"))
    # one all-reduce for both flags; the stop flag is filled, not copied: no host wait
    flags = torch.stack([(~finite).float(), torch.full((), float(stop_requested), device=loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    ok = guard.admit(flags[0] == 0)
    optimizer_step(optimizer, ok)
    accelerator.unwrap_model(model).update_momentum(progress, ok)
    restore_buffers(unless=ok)  # a skipped forward put NaN into batch-norm statistics (DINO: its centre)
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, ok, flags[1]


def grad_norm(accelerator: Accelerator, model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """Global gradient norm (clipped to `clip` if given), NaN or inf if any gradient is."""
    if clip is not None:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
