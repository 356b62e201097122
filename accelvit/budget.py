"""Cost model and budget accounting.

A run's budget is counted in units of one forward pass of the uncompressed backbone on one image
(Lin et al., NeurIPS 2024). A training step costs, per image, the sum over its encoder passes
(`Branch`): views x (3 if the pass is gradient-carrying, forward + backward, else 1) x the pass's
forward cost relative to the uncompressed one. That relative cost comes from analytic FLOPs
(`cost.model: flops`, deterministic) or from timing each setting once on the device
(`cost.model: measured`, stored in the run so that a resumed run counts the same). Heads and losses
are not counted: they are a small, constant part of a step.

Plain arithmetic, so schedules can be costed before a model exists (timing a step on the device is
`accelvit.timing`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from accelvit.config import Config, TrainConfig
from accelvit.merge import patch_tokens_per_block
from accelvit.schedule import setting_at
from accelvit.setting import Setting, kept_patches, num_patches, patch_for_size, stem_stride

BACKWARD_FACTOR = 3.0  # forward + backward: the backward pass costs about two forwards


@dataclass(frozen=True)
class VitShape:
    """What the cost of a ViT forward depends on."""

    image_size: int
    embed_dim: int
    depth: int
    mlp_ratio: float = 4.0
    prefix_tokens: int = 1  # class (and register) tokens, never dropped
    in_chans: int = 3
    stem: tuple[int, ...] = ()  # channels of the stride-2 3x3 convolutional stem layers (model.stem)
    num_heads: int = 1  # token merging matches on keys averaged over heads (width embed_dim / heads)


def tokens_per_view(shape: VitShape, setting: Setting) -> int:
    """Sequence length entering the first transformer block for one view (prefix tokens included)."""
    return shape.prefix_tokens + kept_patches(num_patches(shape.image_size, setting.patch), setting.keep)


def activation_bytes(shape: VitShape, patch: int, images: int, element_bytes: int = 4) -> float:
    """A lower bound on the activations a training step keeps for its backward pass: `images`
    views at full input, `element_bytes` a number, per block and token the normed inputs, q, k,
    v, the attention output and its projection, the MLP's hidden layer before and after its
    activation, and the two residual sums ((9 + 2 mlp_ratio) x width); no attention matrix (fused
    attention keeps none)."""
    per_token = (9 + 2 * shape.mlp_ratio) * shape.embed_dim * element_bytes
    return images * tokens_per_view(shape, Setting(1.0, patch)) * shape.depth * per_token


def forward_flops(shape: VitShape, setting: Setting) -> float:
    """Multiply-add FLOPs (x2) of one image's forward pass through the backbone.

    Per block on n tokens of width d: qkv and output projections 8nd^2, attention scores and
    weighted sum 4n^2d, MLP 4*mlp_ratio*nd^2. With token merging, block i runs attention on its n_i
    tokens and the MLP on the n_(i+1) left after merging (`merge.patch_tokens_per_block`), plus the
    matching: averaging the keys over heads (nd) and scoring set A against set B (2|A||B|d/heads).
    The stem and the patch embedding run on every patch, dropped or not.
    """
    d, prefix = shape.embed_dim, shape.prefix_tokens
    patches = num_patches(shape.image_size, setting.patch)
    embed, size, chans = 0.0, shape.image_size, shape.in_chans
    for out_chans in shape.stem:
        size //= 2
        embed += 2 * size * size * 9 * chans * out_chans
        chans = out_chans
    embed += 2 * patches * chans * (setting.patch // stem_stride(shape.stem)) ** 2 * d
    counts = patch_tokens_per_block(kept_patches(patches, setting.keep), setting.merge, shape.depth)
    total = embed
    for before, after in itertools.pairwise(counts):
        n, m = prefix + before, prefix + after
        total += 8 * n * d * d + 4 * n * n * d + 4 * shape.mlp_ratio * m * d * d
        if after < before:
            total += n * d + 2 * ((before + 1) // 2) * (before // 2) * d / shape.num_heads
    return total


def relative_cost(shape: VitShape, setting: Setting, base_patch: int) -> float:
    """Forward FLOPs of `setting` relative to the uncompressed model (keep 1, base patch)."""
    return forward_flops(shape, setting) / forward_flops(shape, Setting(1.0, base_patch))


@dataclass(frozen=True)
class Branch:
    """One encoder pass of a training step: `views` views per image, each of side `size` pixels."""

    views: int
    size: int
    backward: bool  # gradient-carrying (forward + backward) or a momentum encoder (forward only)
    drops_tokens: bool  # token dropout and merging apply to this pass


def branch_setting(branch: Branch, setting: Setting, base_patch: int, stride: int = 1) -> Setting:
    """The setting one pass runs at: its own patch for its size, full tokens unless it drops them
    (`stride`: the convolutional stem's)."""
    patch = patch_for_size(setting.patch, branch.size, base_patch, stride)
    return replace(setting if branch.drops_tokens else setting.full_tokens(), patch=patch)


def step_flops_cost(shape: VitShape, branches: list[Branch], setting: Setting, base_patch: int) -> float:
    """Budget units per image of one training step under the analytic FLOPs model."""
    unit = forward_flops(shape, Setting(1.0, base_patch))
    total = 0.0
    for b in branches:
        pass_setting = branch_setting(b, setting, base_patch, stem_stride(shape.stem))
        flops = forward_flops(replace(shape, image_size=b.size), pass_setting)
        total += b.views * (BACKWARD_FACTOR if b.backward else 1.0) * flops / unit
    return total


CostFn = Callable[[Setting], float]  # setting -> budget units per image of one step


def flops_cost_fn(shape: VitShape, branches: list[Branch], base_patch: int) -> CostFn:
    return lambda setting: step_flops_cost(shape, branches, setting, base_patch)


def table_cost_fn(table: list[dict]) -> CostFn:
    """Measured costs: rows {keep, patch, merge, units} (merge absent: 0).

    Per patch size: linear in keep between the measured keeps of a merge fraction, then linear in
    merge between the two measured fractions around the setting's.
    """
    curves: dict[int, dict[float, list[tuple[float, float]]]] = {}
    for row in table:
        by_merge = curves.setdefault(int(row["patch"]), {})
        by_merge.setdefault(float(row.get("merge", 0.0)), []).append(
            (float(row["keep"]), float(row["units"]))
        )
    for by_merge in curves.values():
        for points in by_merge.values():
            points.sort()

    def cost(setting: Setting) -> float:
        by_merge = curves.get(setting.patch)
        if by_merge is None:
            raise ValueError(f"patch {setting.patch} was not measured (measured: {sorted(curves)})")
        merges = sorted(by_merge)
        if not merges[0] <= setting.merge <= merges[-1]:
            raise ValueError(
                f"merge {setting.merge:g} at patch {setting.patch} was not measured (measured: {merges})"
            )
        if setting.merge in by_merge:
            return _along(by_merge[setting.merge], setting.keep)
        j = next(j for j, m in enumerate(merges) if m > setting.merge)
        (m0, m1), keep = merges[j - 1 : j + 1], setting.keep
        u0, u1 = _along(by_merge[m0], keep), _along(by_merge[m1], keep)
        return u0 + (u1 - u0) * (setting.merge - m0) / (m1 - m0)

    return cost


def _along(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation through sorted (x, y) points, extrapolating the end segments."""
    if len(points) == 1:
        return points[0][1]
    i = next((j for j in range(1, len(points)) if x <= points[j][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def finished(train: TrainConfig, step: int, budget_spent: float) -> bool:
    """Whether a run has spent its budget, or taken its steps."""
    if train.budget is not None:
        return budget_spent >= train.budget
    return step >= train.steps


def progress_of(train: TrainConfig, step: int, budget_spent: float) -> float:
    """Training progress in [0, 1]: budget spent over budget, or steps done over steps."""
    if train.budget is not None:
        return min(budget_spent / train.budget, 1.0)
    return min(step / train.steps, 1.0)


@dataclass(frozen=True)
class ScheduleRow:
    step: int
    progress: float
    setting: Setting
    tokens: int
    units: float  # budget units per image of this step
    cost: float  # relative to the same step without compression


def simulate(
    cfg: Config, shape: VitShape, cost: CostFn, global_batch: int, full_units: float | None = None
) -> list[ScheduleRow]:
    """Every step of the run as the loop will take it (adaptive runs: as their ramps say).

    `full_units` is the cost of an uncompressed step (default: `cost` at keep 1, base patch).
    """
    image_size, base, train = cfg.model.image_size, cfg.model.patch_size, cfg.train
    full = full_units if full_units is not None else cost(Setting(1.0, base))
    cache: dict[Setting, float] = {}
    rows, step, spent = [], 0, 0.0
    while (train.budget is None and step < train.steps) or (
        train.budget is not None and spent < train.budget
    ):
        progress = progress_of(train, step, spent)
        stride = stem_stride(cfg.model.stem)
        setting = setting_at(cfg.schedule, progress, image_size, base, stride, step, train.seed)
        if setting not in cache:
            cache[setting] = cost(setting)
        units = cache[setting]
        rows.append(
            ScheduleRow(step, progress, setting, tokens_per_view(shape, setting), units, units / full)
        )
        step += 1
        spent += units * global_batch
    return rows


def sample_rows(rows: list[ScheduleRow], count: int = 11) -> list[ScheduleRow]:
    """The first step at or after each of `count` evenly spaced progress points, and the last step."""
    picks, i = [], 0
    for j in range(count - 1):
        target = j / (count - 1)
        while i < len(rows) - 1 and rows[i].progress < target:
            i += 1
        picks.append(rows[i])
    picks.append(rows[-1])
    return list(dict.fromkeys(picks))


def mean_cost(rows: list[ScheduleRow]) -> float:
    """Average relative cost of the run's steps (1: no saving)."""
    return sum(r.cost for r in rows) / len(rows)
