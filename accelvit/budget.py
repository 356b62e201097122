"""Cost model: tokens a ViT processes under a compression setting, and its analytic FLOPs.

Pure arithmetic (no torch), so schedules can be costed before a model exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelvit.config import ScheduleConfig
from accelvit.schedule import Setting, setting_at


@dataclass(frozen=True)
class VitShape:
    """What the cost of a ViT forward depends on."""

    image_size: int
    embed_dim: int
    depth: int
    mlp_ratio: float = 4.0
    prefix_tokens: int = 1  # class (and register) tokens, never dropped
    in_chans: int = 3


def num_patches(image_size: int, patch: int) -> int:
    return (image_size // patch) ** 2


def kept_patches(patches: int, keep: float) -> int:
    """Patch tokens kept by token dropout: round(keep * patches), at least one."""
    return max(1, min(patches, round(keep * patches)))


def tokens_per_view(shape: VitShape, setting: Setting) -> int:
    """Sequence length the transformer blocks see for one view (prefix tokens included)."""
    return shape.prefix_tokens + kept_patches(num_patches(shape.image_size, setting.patch), setting.keep)


def forward_flops(shape: VitShape, setting: Setting) -> float:
    """Multiply-add FLOPs (x2) of one image's forward pass through the backbone.

    Per block on n tokens of width d: qkv and output projections 8nd^2, MLP 4*mlp_ratio*nd^2,
    attention scores and weighted sum 4n^2d. The patch embedding runs on every patch, dropped or not.
    """
    d, n = shape.embed_dim, tokens_per_view(shape, setting)
    patches = num_patches(shape.image_size, setting.patch)
    embed = 2 * patches * shape.in_chans * setting.patch**2 * d
    block = (8 + 4 * shape.mlp_ratio) * n * d * d + 4 * n * n * d
    return embed + shape.depth * block


def relative_cost(shape: VitShape, setting: Setting, base_patch: int) -> float:
    """Forward FLOPs of `setting` relative to the uncompressed model (keep 1, base patch)."""
    return forward_flops(shape, setting) / forward_flops(shape, Setting(1.0, base_patch))


@dataclass(frozen=True)
class ScheduleRow:
    step: int
    progress: float
    setting: Setting
    tokens: int
    cost: float  # forward FLOPs relative to the uncompressed model


def schedule_rows(
    schedule: ScheduleConfig, shape: VitShape, base_patch: int, steps: int, rows: int = 11
) -> list[ScheduleRow]:
    """The schedule sampled at `rows` evenly spaced steps from 0 to `steps`."""
    picks = sorted({round(i * steps / (rows - 1)) for i in range(rows)}) if rows > 1 else [0]
    return [_row(schedule, shape, base_patch, steps, s) for s in picks]


def mean_cost(schedule: ScheduleConfig, shape: VitShape, base_patch: int, steps: int) -> float:
    """Average relative cost of all `steps` steps (1: no saving)."""
    total = sum(_row(schedule, shape, base_patch, steps, s).cost for s in range(steps))
    return total / steps


def _row(schedule: ScheduleConfig, shape: VitShape, base_patch: int, steps: int, step: int):
    setting = setting_at(schedule, step / steps, shape.image_size, base_patch)
    return ScheduleRow(
        step=step,
        progress=step / steps,
        setting=setting,
        tokens=tokens_per_view(shape, setting),
        cost=relative_cost(shape, setting, base_patch),
    )
