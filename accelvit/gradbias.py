"""Gradient-bias estimator: how far the gradient of a compressed input is from the full-input one.

On K batches, the same augmented views give the full-input gradient g_k (keep 1, base patch) and,
for each strategy s = (keep, patch), the compressed gradient ĝ_{s,k} (fresh token subsets). With
paired differences d_{s,k} = ĝ_{s,k} - g_k it reports, over the whole model and per parameter group:

- bias_sq: unbiased estimate of ||E d||^2, the mean of d_i . d_j over pairs of batches i != j
  (= ||mean d||^2 - tr Cov(d) / K; may be slightly negative), and the plain ||mean d||^2
  (`bias_sq_plain`), which batch noise inflates by tr Cov(d) / K;
- relative_bias: sqrt(bias_sq / ||E g||^2) with ||E g||^2 estimated the same unbiased way, and
  `relative_bias_plain`, ||mean d|| / ||mean g|| (at K = 4 noise alone can make it read 100%);
- variance: tr Cov(ĝ_s) per batch (and `variance_full` of g);
- cosine: cos(E ĝ_s, E g) from unbiased dot products (None when noise swamps them), `cosine_plain`
  of the means and `cosine_batch`, the mean per-batch cosine;
- cost: measured step time relative to the full step with its standard error over batches
  (`cost_se`), and `flops`, the analytic ratio;
- ca_mse = bias_sq + cost * variance: at a fixed compute budget a strategy that is c times cheaper
  takes 1/c times as many steps, dividing its variance (Lin et al., NeurIPS 2024);
- `bias_sq_se`, `ca_mse_se`: standard errors over batches, by the delete-one jackknife;
- descent: what one AdamW step under the strategy does for the full-input loss, d = eta <g, P E ĝ>
  - (eta^2 / 2) (L ||P E ĝ||^2 + L_noise (1 - beta1) / (1 + beta1) tr Cov(P ĝ)) (first-order decrease
  minus the second-order penalty of the mean update and of the noise its momentum leaves),
  with eta the learning rate, P AdamW's diagonal preconditioner 1 / (sqrt(v) + eps) (v: the
  optimizer's second moment, or the K full-input gradients' where there is no optimizer state yet)
  and L the curvature of the loss, from a secant of one batch's gradient over one step: along the
  mean update for its square (`curvature`), along the batch's noise for the rest of E||P ĝ||^2
  (`curvature_noise`). Bias lowers the first term, variance raises the second; per unit of cost
  it is what the `descent` metric of `accelvit plan` and the adaptive schedule ranks (`plan`).
  `descent_full` is full input's own, `descent_se` the jackknife's.

Every estimate is a function of the Gram matrices of the K gradients, so the per-batch gradients are
kept on the CPU (K x parameters x (strategies + 1) floats) and gathered across processes; the
model's parameters, buffers and gradients are left as they were.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from accelvit.objectives import buffer_restorer
from accelvit.setting import Setting


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
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """The per-batch gradients of full input and of each strategy over `batches` (this process's share).

    Args:
        model: the objective module, not wrapped for data parallelism (each process measures its
            own batches). Buffers (batch-norm statistics, DINO's centre) are restored before every
            forward, so all strategies see the same state; parameters and gradients are untouched.
        batches: lists of view tensors, on the model's device.
        strategies: compressed settings to compare with Setting(1, base_patch).
        gather: `tensor -> tensor` concatenating every process's rows (default: identity).
        autocast: mixed-precision context (e.g. `accelerator.autocast`).
        lr: the step size of the descent criterion; given, the result also holds AdamW's
            preconditioner (from `optimizer`'s state where it has one) and the curvature along the
            full-input update, measured on this process's last batch.
    Returns:
        `summarize`'s input: the groups, the full gradients (K, P) and each strategy's (K, P), kept on
        the CPU in float32 (K x P x (strategies + 1) x 4 bytes), and each gradient's seconds (K,) with
        the batches that were timed (a process's first batch warms up kernels and caches).
    """
    params, groups = parameter_groups(model)
    saved_grads = [p.grad for p in params]
    restore_buffers = buffer_restorer(model)
    full_setting = Setting(1.0, base_patch)
    full: list[torch.Tensor] = []
    per_strategy: list[list[torch.Tensor]] = [[] for _ in strategies]
    seconds: list[list[float]] = []  # per batch: full, then each strategy
    views = None
    try:
        for views in batches:
            restore_buffers()
            with _per_process_losses(model):
                g, tick = gradient(model, params, views, full_setting, progress, autocast)
            full.append(g.cpu())
            times = [tick]
            for setting, rows in zip(strategies, per_strategy, strict=True):
                restore_buffers()
                with _per_process_losses(model):
                    gs, tick = gradient(model, params, views, setting, progress, autocast)
                rows.append(gs.cpu())
                times.append(tick)
            seconds.append(times)
        device = params[0].device
        gather = gather or (lambda t: t)

        def gathered(rows: list[torch.Tensor]) -> torch.Tensor:
            return gather(torch.stack(rows).to(device)).cpu()

        timed = torch.tensor([float(i > 0) for i in range(len(seconds))], dtype=torch.float64)
        secs = torch.tensor(seconds, dtype=torch.float64)
        raw = {
            "groups": groups,
            "full": gathered(full),
            "strategies": [(s, gathered(rows)) for s, rows in zip(strategies, per_strategy, strict=True)],
            "seconds": gather(secs.to(device)).cpu(),
            "timed": gather(timed.to(device)).cpu(),
        }
        if lr is not None and views is not None:
            precondition, source = preconditioner(params, raw["full"], optimizer)
            mean = raw["full"].mean(0)
            # the curvature along the mean update and along this batch's noise around it: noise
            # directions need not bend as the mean direction does, and one curvature for both
            # charged the noise of a preconditioned step as if it lay along the gradient
            bends, tick = [], time.perf_counter()
            g0 = full[-1]  # this process's last batch, probed again
            for direction in (precondition * mean, precondition * (g0 - mean)):
                restore_buffers()
                with _per_process_losses(model):
                    bend = curvature(
                        model, params, views, full_setting, progress, g0, direction, lr, autocast
                    )
                bends.append(bend)
            # every process probed its own last batch: their mean
            probe = torch.tensor([*bends, time.perf_counter() - tick], dtype=torch.float64, device=device)
            probes = gather(probe).view(-1, 3).cpu()
            raw |= {"lr": lr, "preconditioner": precondition, "preconditioner_from": source}
            raw["momentum"] = optimizer.param_groups[0]["betas"][0] if optimizer is not None else ADAM_BETA1
            raw |= {"curvature": probes[:, 0].mean().item(), "curvature_noise": probes[:, 1].mean().item()}
            raw["curvature_s"] = probes[:, 2].sum().item()
        return raw
    finally:
        restore_buffers()
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad


ADAM_EPS, ADAM_BETA1 = 1e-8, 0.9  # torch's AdamW defaults, which build_optimizer keeps


def preconditioner(
    params: list[nn.Parameter], full: torch.Tensor, optimizer: torch.optim.Optimizer | None
) -> tuple[torch.Tensor, str]:
    """AdamW's diagonal preconditioner 1 / (sqrt(v) + eps) in `params`' flat order, and where v came
    from: the optimizer's bias-corrected second moment ("optimizer"), or, with no state yet (a
    fresh model, or a checkpoint read without its optimizer), the mean square of the K full-input
    gradients `full` (K, P), the quantity AdamW's second moment tracks ("batches")."""
    state = getattr(optimizer, "state", {}) if optimizer is not None else {}
    moments = [state.get(p, {}) for p in params]
    if all("exp_avg_sq" in m for m in moments):
        beta2 = optimizer.param_groups[0]["betas"][1]
        v = torch.cat(
            [m["exp_avg_sq"].reshape(-1).float().cpu() / (1 - beta2 ** float(m["step"])) for m in moments]
        )
        return 1 / (v.sqrt() + ADAM_EPS), "optimizer"
    return 1 / (full.float().square().mean(0).sqrt() + ADAM_EPS), "batches"


def curvature(
    model: nn.Module,
    params: list[nn.Parameter],
    views: list[torch.Tensor],
    setting: Setting,
    progress: float,
    g0: torch.Tensor,
    update: torch.Tensor,
    lr: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """The loss's curvature along `update` u, from a secant over one step of size `lr` on `views`:
    L = <g(θ) - g(θ - lr u), u> / (lr ||u||^2), with g0 = g(θ) (CPU) already measured on them.
    Parameters are put back; negative curvature (the loss bending down) reads as 0, no penalty."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, u in zip(params, update.split([p.numel() for p in params]), strict=True):
            p.sub_(lr * u.view_as(p).to(p))
    try:
        g1, _ = gradient(model, params, views, setting, progress, autocast)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    u = update.double()
    bend = (g0.double() - g1.cpu().double()) @ u / (lr * u.square().sum())
    return max(bend.item(), 0.0)


# Statistics of K gradients from their Gram matrices (K x K, float64): every estimate below is a
# function of dot products between batches, so the jackknife (leave one batch out) gives its spread.


def _mean_sq(gram: torch.Tensor) -> torch.Tensor:
    """||mean x||^2, plain."""
    return gram.sum() / len(gram) ** 2


def _mean_sq_unbiased(gram: torch.Tensor) -> torch.Tensor:
    """Unbiased ||E x||^2: the mean of x_i . x_j over pairs i != j (= ||mean x||^2 - tr Cov / K)."""
    k = len(gram)
    return (gram.sum() - gram.trace()) / (k * (k - 1))


def _trace_cov(gram: torch.Tensor) -> torch.Tensor:
    """tr Cov of the K vectors (unbiased, K - 1 in the denominator)."""
    k = len(gram)
    return (gram.trace() - gram.sum() / k) / (k - 1)


def _jackknife_se(stat: Callable[..., torch.Tensor], *grams: torch.Tensor) -> float | None:
    """Standard error of `stat(*grams)` over batches by the delete-one jackknife (None below K = 3)."""
    k = len(grams[0])
    if k < 3:
        return None
    keep = torch.ones(k, dtype=torch.bool)
    values = []
    for i in range(k):
        keep[i] = False
        values.append(stat(*(g[keep][:, keep] for g in grams)))
        keep[i] = True
    v = torch.stack(values)
    return ((k - 1) / k * (v - v.mean()).square().sum()).sqrt().item()


def _ratio_sqrt(num: torch.Tensor, den: torch.Tensor) -> float | None:
    """sqrt(num / den), None when the denominator is not positive (noise swamps the signal)."""
    return (num.clamp_min(0) / den).sqrt().item() if den > 0 else None


def _cosine(cross: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> float | None:
    if sq_a <= 0 or sq_b <= 0:
        return None
    return (cross / (sq_a * sq_b).sqrt()).clamp(-1, 1).item()


def _strategy_stats(gs: torch.Tensor, gg: torch.Tensor, gsg: torch.Tensor, cost: float) -> dict:
    """The statistics of one strategy (one parameter group) from Gram matrices of its gradients (gs),
    the full gradients (gg) and their cross products (gsg[i, j] = ĝ_i . g_j)."""
    gd = gs - gsg - gsg.T + gg  # d_i . d_j of the paired differences d = ĝ - g

    def bias_sq(gd: torch.Tensor) -> torch.Tensor:
        return _mean_sq_unbiased(gd)

    def ca_mse(gd: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        return _mean_sq_unbiased(gd) + cost * _trace_cov(gs)

    bias = bias_sq(gd)
    cross_u = (gsg.sum() - gsg.trace()) / (len(gsg) * (len(gsg) - 1))
    per_batch = gsg.diagonal() / (gs.diagonal() * gg.diagonal()).sqrt().clamp_min(1e-30)
    return {
        "bias_sq": bias.item(),
        "bias_sq_se": _jackknife_se(bias_sq, gd),
        "bias_sq_plain": _mean_sq(gd).item(),
        "relative_bias": _ratio_sqrt(bias, _mean_sq_unbiased(gg)),
        "relative_bias_plain": _ratio_sqrt(_mean_sq(gd), _mean_sq(gg)),
        "variance": _trace_cov(gs).item(),
        "variance_se": _jackknife_se(_trace_cov, gs),
        "variance_full": _trace_cov(gg).item(),
        "variance_full_se": _jackknife_se(_trace_cov, gg),
        "cosine": _cosine(cross_u, _mean_sq_unbiased(gs), _mean_sq_unbiased(gg)),
        "cosine_plain": _cosine(gsg.sum() / len(gsg) ** 2, _mean_sq(gs), _mean_sq(gg)),
        "cosine_batch": per_batch.mean().item(),
        "ca_mse": ca_mse(gd, gs).item(),
        "ca_mse_se": _jackknife_se(ca_mse, gd, gs),
    }


def _descent_stats(
    cross: torch.Tensor, gram: torch.Tensor, lr: float, bend: float, bend_noise: float, momentum: float
) -> tuple[float, float | None]:
    """Descent of one AdamW step and its jackknife error, from cross[i, j] = <g_i, P ĝ_j> (i != j
    pairs: batch noise shared by g and ĝ of one batch does not count as descent) and gram[i, j] =
    <P ĝ_i, P ĝ_j>. The update is P times AdamW's first moment, an average of recent gradients:
    its mean is E ĝ, its noise (1 - beta1) / (1 + beta1) of one batch's (an exponential average of
    independent batches). The square of the mean update is charged the mean direction's curvature,
    the noise the noise's."""
    damped = (1 - momentum) / (1 + momentum)

    def descent(cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        first = _mean_sq_unbiased(cross)  # the same pair mean, of <g_i, P ĝ_j>
        mean_sq, noise = _mean_sq_unbiased(gram), _trace_cov(gram)  # ||P E ĝ||^2, tr Cov(P ĝ)
        return lr * first - lr**2 / 2 * (bend * mean_sq + bend_noise * damped * noise)

    return descent(cross, gram).item(), _jackknife_se(descent, cross, gram)


def _descent_rows(raw: dict) -> list[dict]:
    """Per strategy: `descent`, `descent_se`, and full input's `descent_full`, `descent_full_se`."""
    precondition, g = raw["preconditioner"].double(), raw["full"].double()
    lr, bend, bend_noise, momentum = raw["lr"], raw["curvature"], raw["curvature_noise"], raw["momentum"]

    def stats(s: torch.Tensor) -> tuple[float, float | None]:
        ps = s.double() * precondition
        return _descent_stats(g @ ps.T, ps @ ps.T, lr, bend, bend_noise, momentum)

    full, full_se = stats(g)
    return [
        {"descent": d, "descent_se": se, "descent_full": full, "descent_full_se": full_se}
        for d, se in (stats(s) for _, s in raw["strategies"])
    ]


def _costs(raw: dict) -> list[tuple[float, float | None]]:
    """Each strategy's measured cost relative to full input, and its standard error over batches."""
    secs, timed = raw["seconds"], raw["timed"].bool()
    if not timed.any():  # one batch per process: time it anyway rather than report nothing
        timed = torch.ones_like(timed)
    full = secs[timed, 0]
    out = []
    for j in range(1, secs.shape[1]):
        ratios = secs[timed, j] / full.clamp_min(1e-12)
        cost = (secs[timed, j].sum() / full.sum()).item() if full.sum() > 0 else float("nan")
        se = (ratios.std() / len(ratios) ** 0.5).item() if len(ratios) > 1 else None
        out.append((cost, se))
    return out


def summarize(raw: dict, flops: dict[Setting, float] | None = None) -> list[dict]:
    """Per-strategy statistics, whole model and per group, from `measure`'s gradients.

    Whole-model keys sit on the row itself; `groups` holds the same statistics per parameter group.
    `relative_bias` and `cosine` are bias-corrected (None when the batch noise swamps ||E g||^2);
    `*_plain` are the plain ratios of means, inflated by batch noise at small K.
    """
    groups: list[Group] = raw["groups"]
    g = raw["full"]
    names = [gr.name for gr in groups] + ["total"]
    slices = [(gr.start, gr.stop) for gr in groups] + [(0, g.shape[1])]
    grams_g = [g[:, a:b].double() @ g[:, a:b].double().T for a, b in slices]
    rows = []
    for (setting, s), (cost, cost_se) in zip(raw["strategies"], _costs(raw), strict=True):
        row: dict = {"keep": setting.keep, "patch": setting.patch, "merge": setting.merge}
        row |= {"cost": cost, "cost_se": cost_se}
        if flops is not None:
            row["flops"] = flops[setting]
        per_group = {}
        for name, (a, b), gg in zip(names, slices, grams_g, strict=True):
            sa, ga = s[:, a:b].double(), g[:, a:b].double()
            per_group[name] = _strategy_stats(sa @ sa.T, gg, sa @ ga.T, cost)
        row.update(per_group.pop("total"))
        row["groups"] = per_group
        rows.append(row)
    if "curvature" in raw:
        for row, descent in zip(rows, _descent_rows(raw), strict=True):
            row.update(descent)
    return rows


# ---------------------------------------------------------------------------------------------
# Running the estimator on a recipe or a run's checkpoint

# 2: bias-corrected relative_bias and cosine, standard errors (descent, lr and curvature: optional)
SCHEMA = "accelvit.grad-error/2"
