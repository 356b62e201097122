"""Choosing compression strategies from gradient-error reports: the budget-optimal schedule.

At a fixed compute budget a strategy c times cheaper than full input takes 1/c times as many steps,
so its gradient error per unit of budget is CA-MSE = bias² + c · variance (Lin et al., NeurIPS 2024).
Early in training variance dominates and cheap, heavily compressed steps win; later bias dominates
and lighter compression wins. Full input is always a candidate: bias 0, cost 1, its own variance.

Used offline (`accelvit plan`: reports taken at several progress points -> a `step` schedule) and
online (`schedule.mode: adaptive`: the run measures and decides at each stage).

Two metrics. `model` (the reference's): CA-MSE of the whole gradient vector. It weighs each parameter
by the size of its raw gradient, so the group with the largest gradients decides: with a conv stem the
patch embedding held 96% of the whole-model CA-MSE of `1:8` (MoCo-v3, docs/schedules.md: Which CA-MSE),
while AdamW scales every coordinate's step by its own gradient size. `groups`: each parameter group's
CA-MSE in units of its own full-input batch noise (full input scores 1 in every group), averaged
over the groups, so every block counts alike, closer to what an adaptive optimizer sees.

A third metric, `descent`, ranks what a step does for training rather than how far its gradient is
from the full-input one: the expected decrease of the full-input loss by one AdamW step on a batch
under the strategy (first order minus the second-order penalty of its noise, `gradbias`), per unit
of cost. CA-MSE counts bias as pure error and credits the extra steps a cheap setting buys only
through its variance; descent per unit cost credits both where they act, on the loss.

A fourth, `lookahead` (`accelvit.lookahead`), measures it instead of predicting it: each candidate
trains from the current state for the same budget, and the full-input loss on held-out batches is
read after; its rows hold the loss decrease per unit of that budget already. Adaptive runs measure it
at each stage; a run's reports carry it with `train.grad_error_lookahead`.

A CA-MSE measured on K batches has a standard error (the report's jackknife `ca_mse_se`). Candidates
whose CA-MSE is within one combined standard error of the lowest are tied, and the tie rule keeps the
previous stage's choice if it is among them, else takes the lowest CA-MSE: a noisy ranking should not
switch strategies, and the point estimate is still the best guess. Preferring the cheapest of the tied
(this module's first rule) counted cost twice, since CA-MSE already charges c · variance: on SimCLR it
took `0.25:8` over full input whose CA-MSE was 20% lower (benchmarks/schedule_families).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from accelvit.config import ConfigError
from accelvit.setting import Setting, setting_of

NOISE_Z = 1.0  # candidates within this many combined standard errors of the lowest CA-MSE are tied
METRICS = ("model", "groups", "descent", "lookahead")  # lookahead: runs with train.grad_error_lookahead
PER_COST = ("descent", "lookahead")  # the metrics that rank a gain per unit cost (higher is better)


@dataclass(frozen=True)
class Choice:
    setting: Setting
    ca_mse: float  # the metric's value, lower is better: CA-MSE, or minus the gain per unit cost
    runner_up: Setting | None
    runner_up_ca_mse: float | None
    tied: tuple[Setting, ...] = field(default=())  # candidates within noise of the lowest CA-MSE
    metric: str = "model"

    @property
    def within_noise(self) -> bool:
        """Whether the ranking's winner is not clear of the noise (the tie rule decided)."""
        return len(self.tied) > 1

    @property
    def margin(self) -> float | None:
        """How much worse the runner-up is, relative to the chosen strategy (0.1: 10% higher CA-MSE,
        or 10% less descent per unit cost)."""
        if self.runner_up_ca_mse is None or self.ca_mse == 0:
            return None
        return (self.runner_up_ca_mse - self.ca_mse) / abs(self.ca_mse)

    def to_dict(self) -> dict:
        key, sign = (f"{self.metric}_per_cost", -1) if self.metric in PER_COST else ("ca_mse", 1)
        return {
            **asdict(self.setting),
            "metric": self.metric,
            key: sign * self.ca_mse,
            "runner_up": None
            if self.runner_up is None
            else {**asdict(self.runner_up), key: sign * self.runner_up_ca_mse},
            "margin": self.margin,
            "tied": [s.label for s in self.tied],
        }


def ca_mse_table(
    report: dict, base_patch: int, cost: Callable[[Setting], float] | None = None, metric: str = "model"
) -> dict:
    """Setting -> CA-MSE for each strategy of `report` and for full input, in `metric` (see above).

    `cost(setting)` gives the relative cost c; by default the report's own `ca_mse` (measured cost).
    `descent`, `lookahead`: minus the gain per unit cost, so that lower is better here too (a
    candidate that diverged, NaN, ranks last).
    """
    full = Setting(1.0, base_patch)
    if metric in PER_COST:
        gains = _per_cost(report, base_patch, cost, metric)
        return {s: math.inf if math.isnan(d) else -d for s, d in gains.items()}
    if metric == "groups":
        tables = [ca_mse_table(sub, base_patch, cost) for sub in _group_reports(report).values()]
        return {s: sum(t[s] / t[full] for t in tables) / len(tables) for s in tables[0]}
    rows = report["strategies"]
    if not rows:
        raise ConfigError(f"grad-error report of step {report.get('step')} has no strategies")
    table = {full: rows[0]["variance_full"]}
    for row in rows:
        setting = setting_of(row)
        if setting == full:
            continue
        table[setting] = row["ca_mse"] if cost is None else row["bias_sq"] + cost(setting) * row["variance"]
    return table


def ca_mse_errors(
    report: dict, base_patch: int, cost: Callable[[Setting], float] | None = None, metric: str = "model"
) -> dict[Setting, float | None]:
    """Setting -> standard error of its CA-MSE (None where the report has none, e.g. K = 2).

    With the report's own costs this is its jackknife `ca_mse_se`; with another cost c it is
    sqrt(se(bias²)² + c² se(variance)²), leaving out their covariance. `groups`: the mean of the
    groups' errors in their own units, as if fully correlated (they come from the same batches; an
    upper bound), taking the full-input noise that sets a group's unit as exact.
    """
    full = Setting(1.0, base_patch)
    if metric in PER_COST:
        return _per_cost(report, base_patch, cost, f"{metric}_se")
    if metric == "groups":
        subs = list(_group_reports(report).values())
        units = [ca_mse_table(sub, base_patch, cost)[full] for sub in subs]
        per_group = [ca_mse_errors(sub, base_patch, cost) for sub in subs]
        errors = {}
        for s in per_group[0]:
            terms = [e[s] for e in per_group]
            if any(t is None for t in terms):
                errors[s] = None
            else:
                errors[s] = sum(t / u for t, u in zip(terms, units, strict=True)) / len(subs)
        return errors
    rows = report["strategies"]
    errors: dict[Setting, float | None] = {full: rows[0].get("variance_full_se")}
    for row in rows:
        setting = setting_of(row)
        if setting == full:
            continue
        if cost is None:
            errors[setting] = row.get("ca_mse_se")
        elif row.get("bias_sq_se") is None or row.get("variance_se") is None:
            errors[setting] = None
        else:
            errors[setting] = math.hypot(row["bias_sq_se"], cost(setting) * row["variance_se"])
    return errors


def _per_cost(
    report: dict, base_patch: int, cost: Callable[[Setting], float] | None, key: str
) -> dict[Setting, float | None]:
    """Setting -> the report's `key` (descent or lookahead, or its standard error) per unit cost; full
    input costs 1. Descent is per step, so it is divided by the relative cost; lookahead rows are per
    unit cost already (the candidates trained for equal budgets)."""
    metric = key.removesuffix("_se")
    rows = report["strategies"]
    if not rows or any(metric not in r for r in rows):
        how = "a run with train.grad_error_lookahead: true" if metric == "lookahead" else "this accelvit"
        raise ConfigError(
            f"grad-error report of step {report.get('step')} has no {metric}: measure it with {how}, "
            "or plan with --metric model"
        )
    full_key = key.replace(metric, f"{metric}_full")
    table = {Setting(1.0, base_patch): rows[0][full_key]}
    for row in rows:
        setting = setting_of(row)
        c = 1.0 if metric == "lookahead" else row["cost"] if cost is None else cost(setting)
        table[setting] = None if row[key] is None else row[key] / c
    return table


def _group_reports(report: dict) -> dict[str, dict]:
    """Parameter group -> the report as if that group were the whole model."""
    rows = report["strategies"]
    names = report.get("groups") or []
    if not rows or not names or any(set(names) - set(r.get("groups", {})) for r in rows):
        raise ConfigError(f"grad-error report of step {report.get('step')} has no per-group statistics")
    keys = ("keep", "patch", "merge", "cost", "flops")
    return {
        g: {**report, "strategies": [{**{k: r[k] for k in keys if k in r}, **r["groups"][g]} for r in rows]}
        for g in names
    }


def choose(
    table: dict[Setting, float],
    allowed: Callable[[Setting], bool] = lambda s: True,
    errors: dict[Setting, float | None] | None = None,
    previous: Setting | None = None,
    metric: str = "model",
) -> Choice:
    """The allowed strategy with the lowest CA-MSE and the runner-up; with standard errors, the tie
    rule among the candidates within noise of the lowest: `previous` if tied, else the lowest."""
    # exact ties go to the least compressed: smaller patch, higher keep, less merging
    ranked = sorted((value, s.patch, -s.keep, s.merge, s) for s, value in table.items() if allowed(s))
    if not ranked:
        raise ValueError("no strategy is allowed")
    best_value, best = ranked[0][0], ranked[0][-1]
    errors = errors or {}

    def within_noise(value: float, s: Setting) -> bool:
        a, b = errors.get(s), errors.get(best)
        return a is not None and b is not None and value - best_value <= NOISE_Z * math.hypot(a, b)

    tied = tuple(r[-1] for r in ranked if r[-1] == best or within_noise(r[0], r[-1]))
    chosen = best
    if len(tied) > 1:
        chosen = previous if previous in tied else best
    others = [r for r in ranked if r[-1] != chosen]
    return Choice(
        chosen,
        table[chosen],
        others[0][-1] if others else None,
        others[0][0] if others else None,
        tied if len(tied) > 1 else (),
        metric,
    )


def choose_stage(
    report: dict,
    cost: Callable[[Setting], float],
    base_patch: int,
    previous: Setting | None,
    monotone: bool,
    metric: str = "model",
) -> Choice:
    """The adaptive schedule's choice for the next stage: CA-MSE in `metric` with the run's own step
    costs (`cost`: budget units of a step), never a cheaper step than `previous` when `monotone`."""
    full = cost(Setting(1.0, base_patch))

    def relative(s: Setting) -> float:
        return cost(s) / full

    table = ca_mse_table(report, base_patch, relative, metric)
    errors = ca_mse_errors(report, base_patch, relative, metric)
    floor = cost(previous) if previous is not None and monotone else 0.0
    return choose(table, lambda s: cost(s) >= floor - 1e-12, errors, previous, metric)


def plan(
    reports: list[dict], base_patch: int, cost: str = "flops", metric: str = "model"
) -> list[tuple[float, Choice]]:
    """One choice per report, ordered by the progress it was taken at (each one starts a stage).

    `cost`: flops (the reports' analytic ratios, the default: the same on any machine and load) or
    measured (the step times of the machine and moment each report was taken on). `metric`: model,
    groups or descent (module docstring).
    """
    if cost not in ("measured", "flops"):
        raise ConfigError(f"--cost {cost!r}: expected measured or flops")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    stages: list[tuple[float, Choice]] = []
    for report in sorted(reports, key=lambda r: r["progress"]):
        flops = {setting_of(r): r["flops"] for r in report["strategies"]} | {Setting(1.0, base_patch): 1.0}
        by_flops = flops.__getitem__ if cost == "flops" else None
        previous = stages[-1][1].setting if stages else None
        choice = choose(
            ca_mse_table(report, base_patch, by_flops, metric),
            errors=ca_mse_errors(report, base_patch, by_flops, metric),
            previous=previous,
            metric=metric,
        )
        stages.append((report["progress"], choice))
    progress = [p for p, _ in stages]
    if len(set(progress)) != len(progress):
        raise ConfigError(f"two reports were taken at the same progress ({progress}); give one per stage")
    return stages


def plan_warnings(reports: list[dict], stages: list[tuple[float, Choice]], base_patch: int) -> list[str]:
    """What a reader of a plan should know: reports too small for standard errors, negative bias²
    (a bias below the batch noise), choices within noise, and a plan that compresses more later."""
    warnings = []
    for report in sorted(reports, key=lambda r: r["progress"]):
        where = f"report at progress {report['progress']:g}"
        k = report.get("batches")
        if k is not None and k < 3:
            warnings.append(f"{where}: K = {k} batches gives no standard errors; measure with --batches 4+")
        for row in report["strategies"]:
            if row["bias_sq"] < 0:
                se = row.get("bias_sq_se")
                noise = f" ± {se:.3g}" if se is not None else ""
                warnings.append(
                    f"{where}: bias² of {setting_of(row).label} is negative ({row['bias_sq']:.3g}{noise}): "
                    "its bias is below what K batches can resolve"
                )
    for progress, choice in stages:
        if choice.within_noise:
            warnings.append(
                f"stage at {progress:g}: {', '.join(s.label for s in choice.tied)} are within noise of "
                f"each other; the tie rule chose {choice.setting.label}"
            )
    costs = [(p, c.setting, _step_cost(reports, p, c.setting, base_patch)) for p, c in stages]
    for (p0, s0, c0), (p1, s1, c1) in zip(costs, costs[1:], strict=False):
        if c1 < c0 - 1e-12:
            warnings.append(
                f"the plan is not monotone: {s1.label} from {p1:g} is cheaper than {s0.label} from {p0:g}"
            )
    return warnings


def _step_cost(reports: list[dict], progress: float, setting: Setting, base_patch: int) -> float:
    """The analytic cost of `setting` (1 for full input) from the report taken at `progress`."""
    if setting == Setting(1.0, base_patch):
        return 1.0
    report = next(r for r in reports if r["progress"] == progress)
    return next(r["flops"] for r in report["strategies"] if setting_of(r) == setting)


def schedule_from_plan(stages: list[tuple[float, Choice]]) -> dict:
    """A `step` schedule (keep, patch, and merge if a stage merges) that a recipe can include; the
    first stage starts at 0."""
    points = [(0.0 if i == 0 else p, c.setting) for i, (p, c) in enumerate(stages)]
    knobs = ["keep", "patch"] + (["merge"] if any(s.merge for _, s in points) else [])
    return {k: {"shape": "step", "points": [[p, getattr(s, k)] for p, s in points]} for k in knobs}


def write_schedule(path: Path, schedule: dict, sources: list[str]) -> None:
    header = "# written by `accelvit plan` from " + ", ".join(sources) + "\n"
    header += (
        "# use it with: schedule: !include " + path.name + "   or   --set schedule.file=" + str(path) + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(schedule, default_flow_style=None, sort_keys=False))


def format_plan(stages: list[tuple[float, Choice]]) -> str:
    metric = stages[0][1].metric if stages else "model"
    name, sign = (f"{metric}/c", -1) if metric in PER_COST else ("CA-MSE", 1)
    lines = [f"{'from':>6}  {'choice':>10}  {name:>10}  {'runner-up':>10}  {name:>10}  {'margin':>7}  tied"]
    for progress, c in stages:
        up = c.runner_up.label if c.runner_up else "-"
        up_value = f"{sign * c.runner_up_ca_mse:10.3e}" if c.runner_up_ca_mse is not None else f"{'-':>10}"
        margin = f"{c.margin:7.1%}" if c.margin is not None else f"{'-':>7}"
        value = f"{sign * c.ca_mse:10.3e}"
        lines.append(
            f"{progress:6.2f}  {c.setting.label:>10}  {value}  {up:>10}  {up_value}  {margin}  "
            + (", ".join(s.label for s in c.tied) if c.within_noise else "-")
        )
    return "\n".join(lines)
