"""The schedule engine: training progress (0 -> 1) to a compression setting (keep, patch, merge).

Pure and deterministic: the setting is a function of progress (for the `random` shape also of the
seed and step, for the adaptive schedule of the decisions recorded so far), so resuming a run needs
only its checkpointed TrainState. The learning
rate follows the same progress (warm-up, then cosine or poly decay).
"""

from __future__ import annotations

import math
import random

from accelvit.config import OptimConfig, RampConfig, ScheduleConfig
from accelvit.setting import MAX_MERGE, Setting, allowed_patch_sizes, setting_of, snap_patch


def ramp_value(ramp: RampConfig, progress: float, default: float | None = None, draw: float = 0.0) -> float:
    """Value of one ramp at `progress` in [0, 1]; `default` stands in for a null start.

    `draw` in [0, 1) picks the value of a `random` ramp (inverse CDF of its weights).
    """
    if ramp.shape == "random":
        choices = ramp.choices or []
        weights = ramp.weights or [1.0] * len(choices)
        target, acc = draw * sum(weights), 0.0
        for value, weight in zip(choices, weights, strict=True):
            acc += weight
            if target < acc:
                return float(value)
        return float(choices[-1])
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


def step_draw(seed: int, step: int, knob: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, step, knob): a random ramp's draw at that step."""
    return random.Random(f"{seed}:{step}:{knob}").random()


def ramp_values(ramp: RampConfig, default: float | None = None) -> list[float]:
    """Every value a ramp can take at progress 0, 1 or any draw of a random ramp (for cost tables)."""
    if ramp.shape == "random":
        return [float(v) for v in ramp.choices or []]
    if ramp.shape == "step":
        return [float(v) for _, v in ramp.points or []]
    return [ramp_value(ramp, 0.0, default), ramp_value(ramp, 1.0, default)]


def setting_at(
    cfg: ScheduleConfig,
    progress: float,
    image_size: int,
    base_patch: int,
    stride: int = 1,
    step: int = 0,
    seed: int = 0,
) -> Setting:
    """The compression setting at `progress` (0: start of training, 1: end); `stride`: the stem's.

    `step` and `seed` fix the draws of `random` ramps, so a resumed run redraws the same settings.
    """

    def value(knob: str, default: float | None) -> float:
        ramp = getattr(cfg, knob)
        draw = step_draw(seed, step, knob) if ramp.shape == "random" else 0.0
        return ramp_value(ramp, progress, default, draw)

    keep = min(max(value("keep", None), 1e-6), 1.0)
    merge = min(max(value("merge", 0.0), 0.0), MAX_MERGE)
    if cfg.keep_buckets:  # toward less compression, so a bucketed run never compresses more than asked
        n = cfg.keep_buckets
        keep = math.ceil(keep * n - 1e-9) / n
        merge = math.floor(merge * 2 * n + 1e-9) / (2 * n)
    return Setting(
        keep=keep,
        patch=snap_patch(value("patch", base_patch), allowed_patch_sizes(image_size, base_patch, stride)),
        merge=merge,
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


def weight_decay_at(cfg: OptimConfig, progress: float) -> float:
    """Cosine from `cfg.weight_decay` at progress 0 to `cfg.weight_decay_end` at 1 (DINO's schedule,
    no warm-up); constant when the end is null."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    t = min(max(progress, 0.0), 1.0)
    start, end = cfg.weight_decay, cfg.weight_decay_end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def current_setting(
    cfg: ScheduleConfig,
    progress: float,
    image_size: int,
    base_patch: int,
    decisions: list[dict],
    stride: int = 1,
    step: int = 0,
    seed: int = 0,
) -> Setting:
    """The setting in force: the latest adaptive decision if any was made, else the ramps."""
    if cfg.mode == "adaptive" and decisions:
        return setting_of(decisions[-1])
    return setting_at(cfg, progress, image_size, base_patch, stride, step, seed)


def due_points(points: list[float], progress: float, done: list[float]) -> list[float]:
    """Progress points reached by `progress` that have not fired yet (each fires once)."""
    return [p for p in points if p <= progress and p not in done]


def due(step: int, every: int | None) -> bool:
    """Whether something done every `every` steps (None: never) is due at `step`."""
    return bool(every) and step % every == 0
