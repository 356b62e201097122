"""Gradient-bias estimator: how far the gradient of a compressed input is from the full-input one.

On K batches, the same augmented views give the full-input gradient g_k (keep 1, base patch) and,
for each strategy s = (keep, patch), the compressed gradient ĝ_{s,k} (fresh token subsets). With
paired differences d_{s,k} = ĝ_{s,k} - g_k it reports, over the whole model and per parameter group:

- bias_sq: unbiased estimate of ||E d||^2 = ||mean d||^2 - tr Cov(d) / K (may be slightly negative),
  and the plain ||mean d||^2 (`bias_sq_plain`);
- relative_bias: ||mean d|| / ||mean g||;
- variance: tr Cov(ĝ_s) per batch (and `variance_full` of g);
- cosine: cos(mean ĝ_s, mean g), and `cosine_batch`, the mean per-batch cosine;
- cost: measured step time relative to the full step, and `flops`, the analytic ratio;
- ca_mse = bias_sq + cost * variance: at a fixed compute budget a strategy that is c times cheaper
  takes 1/c times as many steps, dividing its variance (Lin et al., NeurIPS 2024).

Only running sums are kept (one vector per strategy plus scalars), reduced across processes; the
model's parameters, buffers and gradients are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from accelvit.schedule import Setting


@dataclass(frozen=True)
class Group:
    """A named slice [start, stop) of the flattened gradient."""

    name: str
    start: int
    stop: int


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[Group]]:
    """Trainable parameters in a fixed order, grouped as patch embedding, each block, the rest.

    Groups: `patch_embed` (kernel, position embedding, prefix tokens), `block_0` ... `block_{L-1}`,
    `backbone_norm` (final norms), `head` (every trainable parameter outside the backbone).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def group_of(name: str) -> str:
        if not name.startswith("backbone."):
            return "head"
        rest = name.removeprefix("backbone.")
        if rest.startswith("blocks."):
            return f"block_{int(rest.split('.')[1]):02d}"
        if rest.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")):
            return "patch_embed"
        return "backbone_norm"

    order: dict[str, list[nn.Parameter]] = {}
    for name, param in named:
        order.setdefault(group_of(name), []).append(param)
    keys = sorted(order, key=lambda g: (g != "patch_embed", g == "head", g == "backbone_norm", g))
    params, groups, offset = [], [], 0
    for key in keys:
        size = sum(p.numel() for p in order[key])
        params += order[key]
        groups.append(Group(key, offset, offset + size))
        offset += size
    return params, groups


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenated gradients (float32); a parameter without gradient contributes zeros."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    )


class _Sums:
    """Per-strategy running sums: vector sum of gradients and per-group scalar sums."""

    def __init__(self, size: int, num_groups: int, device: torch.device):
        self.vec = torch.zeros(size, dtype=torch.float64, device=device)
        # per group: sum ||ĝ_k||^2, sum ||d_k||^2, sum cos(ĝ_k, g_k); [0, 3]: seconds after batch 0
        self.scalars = torch.zeros(num_groups + 1, 4, dtype=torch.float64, device=device)


def _group_sq(x: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    return torch.stack(
        [x[g.start : g.stop].double().square().sum() for g in groups] + [x.double().square().sum()]
    )


def _group_dot(x: torch.Tensor, y: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    dots = [(x[g.start : g.stop].double() * y[g.start : g.stop].double()).sum() for g in groups]
    return torch.stack(dots + [(x.double() * y.double()).sum()])


def gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    views: list[torch.Tensor],
    setting: Setting,
    progress: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, float]:
    """The flat gradient of the objective's loss on `views` under `setting`, and its seconds."""
    for p in params:
        p.grad = None
    sync = views[0].device.type == "cuda"
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast():
        loss = model(views, setting, progress)
    loss.float().backward()
    if sync:
        torch.cuda.synchronize()
    return flat_grad(params), time.perf_counter() - start


@contextlib.contextmanager
def _per_process_losses(model: nn.Module) -> Iterator[None]:
    """Losses see only this process's batch, so each process measures its own batches' gradients."""
    flagged = [m for m in model.modules() if getattr(m, "gather_distributed", False)]
    for m in flagged:
        m.gather_distributed = False
    try:
        yield
    finally:
        for m in flagged:
            m.gather_distributed = True


def measure(
    model: nn.Module,
    batches: Iterable[list[torch.Tensor]],
    strategies: list[Setting],
    base_patch: int,
    progress: float = 0.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """Accumulate the statistics over `batches` (this process's share); returns raw sums.

    Args:
        model: the objective module, not wrapped for data parallelism (each process measures its
            own batches). Buffers (batch-norm statistics, DINO's centre) are restored before every
            forward, so all strategies see the same state; parameters and gradients are untouched.
        batches: lists of view tensors, on the model's device.
        strategies: compressed settings to compare with Setting(1, base_patch).
        reduce: `tensor -> tensor` summing over processes (default: identity).
        autocast: mixed-precision context (e.g. `accelerator.autocast`).
    Returns:
        `summarize`'s input: sums for the full gradient and each strategy, and the groups.
    """
    params, groups = parameter_groups(model)
    saved_grads = [p.grad for p in params]
    from accelvit.objectives import buffer_restorer

    restore_buffers = buffer_restorer(model)

    device = params[0].device
    size, ng = sum(p.numel() for p in params), len(groups)
    full = _Sums(size, ng, device)
    sums = [_Sums(size, ng, device) for _ in strategies]
    count = torch.zeros((), dtype=torch.float64, device=device)
    full_setting = Setting(1.0, base_patch)
    try:
        for views in batches:
            restore_buffers()
            with _per_process_losses(model):
                g, seconds = gradient(model, params, views, full_setting, progress, autocast)
            full.vec += g
            full.scalars[:, 0] += _group_sq(g, groups)
            timed = float(count.item() > 0)  # the first batch warms up kernels and caches
            full.scalars[0, 3] += seconds * timed
            for setting, acc in zip(strategies, sums, strict=True):
                restore_buffers()
                with _per_process_losses(model):
                    gs, seconds = gradient(model, params, views, setting, progress, autocast)
                d = gs - g
                acc.vec += gs
                acc.scalars[:, 0] += _group_sq(gs, groups)
                acc.scalars[:, 1] += _group_sq(d, groups)
                norms = (_group_sq(gs, groups) * _group_sq(g, groups)).sqrt().clamp_min(1e-30)
                acc.scalars[:, 2] += _group_dot(gs, g, groups) / norms
                acc.scalars[0, 3] += seconds * timed
            count += 1
    finally:
        restore_buffers()
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
    reduce = reduce or (lambda t: t)
    return {
        "groups": groups,
        "count": reduce(count).item(),
        "full": (reduce(full.vec), reduce(full.scalars)),
        "strategies": [(s, reduce(a.vec), reduce(a.scalars)) for s, a in zip(strategies, sums, strict=True)],
    }


def _trace_cov(sum_sq: torch.Tensor, sum_vec_sq: torch.Tensor, k: float) -> torch.Tensor:
    """tr Cov of K vectors from sum ||x_k||^2 and ||sum x_k||^2 (unbiased, K - 1 in the denominator)."""
    return (sum_sq - sum_vec_sq / k) / max(k - 1, 1)


def summarize(raw: dict, flops: dict[Setting, float] | None = None) -> list[dict]:
    """Per-strategy statistics, whole model (`total`) and per group, from `measure`'s sums."""
    groups: list[Group] = raw["groups"]
    k = raw["count"]
    g_vec, g_scalars = raw["full"]
    full_seconds = g_scalars[0, 3].item() / k
    names = [g.name for g in groups] + ["total"]
    slices = [(g.start, g.stop) for g in groups] + [(0, len(g_vec))]
    rows = []
    for setting, vec, scalars in raw["strategies"]:
        cost = scalars[0, 3].item() / (k * full_seconds) if full_seconds > 0 else float("nan")
        row: dict = {"keep": setting.keep, "patch": setting.patch, "merge": setting.merge, "cost": cost}
        if flops is not None:
            row["flops"] = flops[setting]
        per_group = {}
        for i, (name, (a, b)) in enumerate(zip(names, slices, strict=True)):
            mean_g, mean_s = g_vec[a:b] / k, vec[a:b] / k
            mean_d = mean_s - mean_g
            sum_d = vec[a:b] - g_vec[a:b]
            bias_plain = mean_d.square().sum()
            cov_d = _trace_cov(scalars[i, 1], sum_d.square().sum(), k)
            var_s = _trace_cov(scalars[i, 0], vec[a:b].square().sum(), k)
            var_g = _trace_cov(g_scalars[i, 0], g_vec[a:b].square().sum(), k)
            bias_sq = bias_plain - cov_d / k
            norm_g = mean_g.norm()
            cos = (mean_s @ mean_g) / (mean_s.norm() * norm_g).clamp_min(1e-30)
            per_group[name] = {
                "bias_sq": bias_sq.item(),
                "bias_sq_plain": bias_plain.item(),
                "relative_bias": (mean_d.norm() / norm_g.clamp_min(1e-30)).item(),
                "variance": var_s.item(),
                "variance_full": var_g.item(),
                "cosine": cos.item(),
                "cosine_batch": (scalars[i, 2] / k).item(),
                "ca_mse": (bias_sq + cost * var_s).item(),
            }
        row.update(per_group.pop("total"))
        row["groups"] = per_group
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Running the estimator on a recipe or a run's checkpoint

SCHEMA = "accelvit.grad-error/1"


def default_strategies(base: int, allowed: list[int]) -> list[Setting]:
    patches = [p for p in (base, 2 * base) if p in allowed] or [base]
    return [Setting(k, p) for p in patches for k in (1.0, 0.5, 0.25) if (k, p) != (1.0, base)]


def strategies_or_default(text: str | None, base: int, allowed: list[int]) -> list[Setting]:
    """The keep:patch[:merge] strategies of `text`, or the default grid when it is empty."""
    from accelvit.schedule import parse_strategies

    return parse_strategies(text) if text else default_strategies(base, allowed)


def estimate(
    cfg,
    strategies: list[Setting],
    num_batches: int,
    checkpoint=None,
    step: int = 0,
) -> dict:
    """Run the estimator for `cfg` (weights from `checkpoint`, else a fresh init); returns a report."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from accelvit.backbone import build_backbone
    from accelvit.budget import progress_of
    from accelvit.checkpoint import STATE
    from accelvit.distributed import use_cpu
    from accelvit.objectives import OBJECTIVES

    accelerator = Accelerator(mixed_precision=cfg.train.precision, cpu=use_cpu())
    set_seed(cfg.train.seed)
    model = OBJECTIVES[cfg.objective.name].build(
        cfg.objective, build_backbone(cfg.model), cfg.schedule.dropout_views
    )
    progress = 0.0
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        state = json.loads((checkpoint / STATE).read_text())
        progress = progress_of(cfg.train, state["step"], state.get("budget_spent", 0.0))
    model = model.to(accelerator.device)
    return estimate_model(model, cfg, accelerator, strategies, num_batches, step, progress)


def estimate_model(
    model: nn.Module,
    cfg,
    accelerator,
    strategies: list[Setting],
    num_batches: int,
    step: int,
    progress: float,
    images=None,
) -> dict:
    """The grad-error report of `model` (the objective module, unwrapped) at `step` of `cfg`'s run.

    Batch k is batch `step + k` of the run's data stream (the same views whatever the number of
    processes); process r measures the batches with k % processes == r, token subsets seeded per
    batch, and the sums are added over processes. The global RNG state is left as it was.
    `images`: the run's training split, if already loaded (else it is loaded here).
    """
    from accelvit.augment import batch_views, view_pipeline
    from accelvit.backbone import vit_shape
    from accelvit.budget import relative_cost
    from accelvit.config import patch_sizes, strategy_rule
    from accelvit.data import StepBatchSampler, build_loader, load_dataset
    from accelvit.diagnostics import measure_blocks, probe_batch

    started = time.perf_counter()
    allowed = patch_sizes(cfg.model)
    for s in strategies:
        if not s.fits(allowed):
            raise ValueError(f"strategy {s.label}: {strategy_rule(allowed)}")
    shape = vit_shape(model.backbone, cfg.model.image_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    images = images if images is not None else load_dataset(cfg.data)  # the run passes its own
    stream = StepBatchSampler(len(images), cfg.train.batch_size, cfg.train.seed, step, step + num_batches)
    mine = [(k, keys) for k, keys in enumerate(stream) if k % world == rank]
    transform, specs = view_pipeline(cfg)
    loader = build_loader(
        images,
        transform,
        cfg.data.workers,
        [keys for _, keys in mine],
        accelerator.device.type == "cuda",
    )

    def batches() -> Iterator[list[torch.Tensor]]:
        for (k, _), (views, _, _) in zip(mine, loader, strict=True):
            torch.manual_seed(cfg.train.seed * 1_000_003 + step + k)  # token subsets of batch k
            # batch k's views as the run's first process draws them (data.augment: device)
            yield batch_views(views, specs, cfg.train.seed, step + k, 0, accelerator.device)

    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        raw = measure(
            model,
            batches(),
            strategies,
            cfg.model.patch_size,
            progress,
            reduce=lambda t: accelerator.reduce(t, "sum"),
            autocast=accelerator.autocast,
        )
    flops = {s: relative_cost(shape, s, cfg.model.patch_size) for s in strategies}
    probe = probe_batch(images, cfg.model.image_size).to(accelerator.device)
    return {
        "schema": SCHEMA,
        "model": dataclasses.asdict(cfg.model),
        "objective": cfg.objective.name,
        "dataset": cfg.data.dataset,
        "step": step,
        "progress": progress,
        "batches": int(raw["count"]),
        "batch_size": cfg.train.batch_size,
        "processes": world,
        "device": accelerator.device.type,
        "groups": [g.name for g in raw["groups"]],
        "strategies": summarize(raw, flops),
        "wall_s": time.perf_counter() - started,
        "diagnostics": measure_blocks(model.backbone, probe),  # attention of the measured state
    }
