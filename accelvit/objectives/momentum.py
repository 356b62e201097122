"""The momentum of EMA (key / teacher) encoders over training."""

from __future__ import annotations

import torch
from lightly.utils.scheduler import cosine_schedule


def momentum_at(start: float, progress: float) -> float:
    """Cosine from `start` at progress 0 to 1 at progress 1 (lightly's `cosine_schedule`).

    With max_steps=2, lightly's step / (max_steps - 1) is the progress itself.
    """
    return cosine_schedule(min(max(progress, 0.0), 1.0), 2, start, 1.0)


def momentum_where(m: float, ok: torch.Tensor | None) -> float | torch.Tensor:
    """`m`, or 1 where `ok` (a device flag) is false: a skipped step leaves the EMA encoder as it was,
    without the host reading the flag."""
    return m if ok is None else torch.where(ok, m, 1.0)
