"""Cost model and budget accounting.

A run's budget is counted in units of one forward pass of the uncompressed backbone on one image
(Lin et al., NeurIPS 2024). A training step costs, per image, the sum over its encoder passes
(`Branch`): views x (3 if the pass is gradient-carrying, forward + backward, else 1) x the pass's
forward cost relative to the uncompressed one. That relative cost comes from analytic FLOPs
(`cost.model: flops`, deterministic) or from timing each setting once on the device
(`cost.model: measured`, stored in the run so that a resumed run counts the same). Heads and losses
are not counted: they are a small, constant part of a step.

Everything but `measure_costs` is plain arithmetic, so schedules can be costed before a model exists.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from accelvit.config import Config, TrainConfig, allowed_patch_sizes
from accelvit.schedule import Setting, patch_for_size, setting_at

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
class Branch:
    """One encoder pass of a training step: `views` views per image, each of side `size` pixels."""

    views: int
    size: int
    backward: bool  # gradient-carrying (forward + backward) or a momentum encoder (forward only)
    drops_tokens: bool  # token dropout applies to this pass


def branch_setting(branch: Branch, setting: Setting, base_patch: int) -> Setting:
    """The setting one pass runs at: its own patch for its size, full tokens unless it drops them."""
    return Setting(
        keep=setting.keep if branch.drops_tokens else 1.0,
        patch=patch_for_size(setting.patch, branch.size, base_patch),
    )


def step_flops_cost(shape: VitShape, branches: list[Branch], setting: Setting, base_patch: int) -> float:
    """Budget units per image of one training step under the analytic FLOPs model."""
    unit = forward_flops(shape, Setting(1.0, base_patch))
    total = 0.0
    for b in branches:
        flops = forward_flops(replace(shape, image_size=b.size), branch_setting(b, setting, base_patch))
        total += b.views * (BACKWARD_FACTOR if b.backward else 1.0) * flops / unit
    return total


CostFn = Callable[[Setting], float]  # setting -> budget units per image of one step


def flops_cost_fn(shape: VitShape, branches: list[Branch], base_patch: int) -> CostFn:
    return lambda setting: step_flops_cost(shape, branches, setting, base_patch)


def table_cost_fn(table: list[dict]) -> CostFn:
    """Measured costs: rows {keep, patch, units}; linear in keep between the measured keeps of a patch."""
    by_patch: dict[int, list[tuple[float, float]]] = {}
    for row in table:
        by_patch.setdefault(int(row["patch"]), []).append((float(row["keep"]), float(row["units"])))
    for points in by_patch.values():
        points.sort()

    def cost(setting: Setting) -> float:
        points = by_patch.get(setting.patch)
        if points is None:
            raise ValueError(f"patch {setting.patch} was not measured (measured: {sorted(by_patch)})")
        if len(points) == 1:
            return points[0][1]
        # the segment containing keep, or the nearest end segment (extrapolated)
        i = next((j for j in range(1, len(points)) if setting.keep <= points[j][0]), len(points) - 1)
        (k0, u0), (k1, u1) = points[i - 1], points[i]
        return max(u0 + (u1 - u0) * (setting.keep - k0) / (k1 - k0), 0.0)

    return cost


def progress_of(train: TrainConfig, step: int, budget_spent: float) -> float:
    """Training progress in [0, 1]: budget spent over budget, or steps done over steps."""
    if train.budget is not None:
        return min(budget_spent / train.budget, 1.0)
    return min(step / train.steps, 1.0)


# ---------------------------------------------------------------------------------------------
# Measured costs


def measured_settings(cfg: Config, candidates: Iterable[Setting] = ()) -> list[Setting]:
    """Settings to time: the patch sizes the run can use, each at keeps 0.25 ... 1 and its lowest keep."""
    image_size, base = cfg.model.image_size, cfg.model.patch_size
    allowed = allowed_patch_sizes(image_size, base)
    ramp = [setting_at(cfg.schedule, i / 100, image_size, base) for i in range(101)]
    candidates = list(candidates)
    low, high = min(s.patch for s in ramp), max(s.patch for s in ramp)
    patches = {p for p in allowed if low <= p <= high} | {c.patch for c in candidates} | {base}
    keeps = {0.25, 0.5, 0.75, 1.0} | {c.keep for c in candidates} | {min(s.keep for s in ramp)}
    return [Setting(k, p) for p in sorted(patches) for k in sorted(keeps)]


def measure_costs(model, views: list, settings: list[Setting], repeats: int) -> list[dict]:
    """Time forward + backward of the objective `model` on `views` (one batch) at each setting.

    Units: the median step time over the median time of the backbone's uncompressed forward on the
    batch's first view, i.e. budget units per image. Buffers, gradients and RNG states are restored.
    """
    import torch

    from accelvit.compress import forward_features
    from accelvit.objectives import buffer_restorer

    backbone, base = model.backbone, model.backbone.patch_embed.patch_size[0]
    restore_buffers = buffer_restorer(model)

    def median_time(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            _synchronize(views[0].device)
            tick = time.perf_counter()
            fn()
            _synchronize(views[0].device)
            times.append(time.perf_counter() - tick)
        return statistics.median(times)

    def step(setting: Setting) -> None:
        model(views, setting, 0.0).backward()
        model.zero_grad(set_to_none=True)
        restore_buffers()

    def unit_forward() -> None:
        with torch.no_grad():
            forward_features(backbone, views[0], 1.0, base)

    with torch.random.fork_rng(devices=[views[0].device] if views[0].device.type == "cuda" else []):
        unit = median_time(unit_forward)
        return [
            {"keep": s.keep, "patch": s.patch, "units": median_time(lambda s=s: step(s)) / unit}
            for s in settings
        ]


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_costs(path: Path, table: list[dict], device: str) -> None:
    path.write_text(json.dumps({"device": device, "costs": table}, indent=1) + "\n")


def read_costs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["costs"]


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
        setting = setting_at(cfg.schedule, progress, image_size, base)
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
