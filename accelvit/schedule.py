"""The schedule engine: training progress (0 -> 1) to a compression setting (keep, patch).

Pure and deterministic: the setting is a function of progress (and, for the adaptive schedule, of the
decisions recorded so far), so resuming a run needs only its checkpointed TrainState. The learning
rate follows the same progress (warm-up, then cosine or poly decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from accelvit.config import OptimConfig, RampConfig, ScheduleConfig, allowed_patch_sizes


@dataclass(frozen=True)
class Setting:
    """A compression setting: keep ratio of patch tokens and patch size in pixels."""

    keep: float
    patch: int


def ramp_value(ramp: RampConfig, progress: float, default: float | None = None) -> float:
    """Value of one ramp at `progress` in [0, 1]; `default` stands in for a null start."""
    if ramp.shape == "step":
        points = ramp.points or []
        value = points[0][1]
        for at, v in points:
            if progress >= at:
                value = v
        return float(value)
    start = ramp.start if ramp.start is not None else default
    if start is None:
        raise ValueError("ramp has no start value")
    end = ramp.end if ramp.end is not None else start
    progress = min(max(progress, 0.0), 1.0)
    if ramp.shape == "constant":
        return float(start)
    if ramp.shape == "linear":
        return start + (end - start) * progress
    if ramp.shape == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown ramp shape {ramp.shape!r}")


def snap_patch(value: float, allowed: list[int]) -> int:
    """The allowed patch size nearest to `value` (ties go to the smaller, less compressed one)."""
    return min(allowed, key=lambda p: (abs(p - value), p))


def patch_for_size(patch: int, size: int, base_patch: int) -> int:
    """Patch size for a view of side `size` (e.g. a DINO local crop) when global views use `patch`.

    The same pixel patch size, snapped to the allowed sizes of that view (divisors of `size` no
    smaller than the base), so the patch-scaling factor is the same for every view.
    """
    return snap_patch(patch, allowed_patch_sizes(size, base_patch))


def parse_strategies(text: str) -> list[Setting]:
    """'1.0:16,0.5:16,0.25:32' -> settings (keep:patch pairs)."""
    out = []
    for item in text.split(","):
        keep, sep, patch = item.strip().partition(":")
        try:
            out.append(Setting(float(keep), int(patch)))
        except ValueError:
            raise ValueError(f"--strategies: {item!r} is not keep:patch (e.g. 0.5:16)") from None
    return out


def setting_at(cfg: ScheduleConfig, progress: float, image_size: int, base_patch: int) -> Setting:
    """The compression setting at `progress` (0: start of training, 1: end)."""
    keep = ramp_value(cfg.keep, progress)
    patch = ramp_value(cfg.patch, progress, default=base_patch)
    return Setting(
        keep=min(max(keep, 1e-6), 1.0),
        patch=snap_patch(patch, allowed_patch_sizes(image_size, base_patch)),
    )


def lr_at(cfg: OptimConfig, progress: float) -> float:
    """Linear warm-up to `cfg.lr` over the first `cfg.warmup` of training, then cosine or poly decay.

    Poly: lr * (1 - t)^power, the decay recommended for runs with a fixed compute budget.
    """
    if progress < cfg.warmup:
        return cfg.lr * progress / cfg.warmup
    span = 1.0 - cfg.warmup
    t = min(max((progress - cfg.warmup) / span, 0.0), 1.0) if span > 0 else 1.0
    factor = (1 - t) ** cfg.poly_power if cfg.decay == "poly" else 0.5 * (1 + math.cos(math.pi * t))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def current_setting(
    cfg: ScheduleConfig, progress: float, image_size: int, base_patch: int, decisions: list[dict]
) -> Setting:
    """The setting in force: the latest adaptive decision if any was made, else the ramps."""
    if cfg.mode == "adaptive" and decisions:
        return Setting(decisions[-1]["keep"], decisions[-1]["patch"])
    return setting_at(cfg, progress, image_size, base_patch)


def due_points(points: list[float], progress: float, done: list[float]) -> list[float]:
    """Progress points reached by `progress` that have not fired yet (each fires once)."""
    return [p for p in points if p <= progress and p not in done]
