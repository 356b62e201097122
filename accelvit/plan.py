"""Choosing compression strategies from gradient-error reports: the budget-optimal schedule.

At a fixed compute budget a strategy c times cheaper than full input takes 1/c times as many steps,
so its gradient error per unit of budget is CA-MSE = bias² + c · variance (Lin et al., NeurIPS 2024).
Early in training variance dominates and cheap, heavily compressed steps win; later bias dominates
and lighter compression wins. Full input is always a candidate: bias 0, cost 1, its own variance.

Used offline (`accelvit plan`: reports taken at several progress points -> a `step` schedule) and
online (`schedule.mode: adaptive`: the run measures and decides at each stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from accelvit.config import ConfigError
from accelvit.schedule import Setting, setting_of


@dataclass(frozen=True)
class Choice:
    setting: Setting
    ca_mse: float
    runner_up: Setting | None
    runner_up_ca_mse: float | None

    @property
    def margin(self) -> float | None:
        """How much worse the runner-up is, relative to the chosen strategy (0.1: 10% higher CA-MSE)."""
        if self.runner_up_ca_mse is None or self.ca_mse <= 0:
            return None
        return self.runner_up_ca_mse / self.ca_mse - 1

    def to_dict(self) -> dict:
        return {
            **asdict(self.setting),
            "ca_mse": self.ca_mse,
            "runner_up": None
            if self.runner_up is None
            else {**asdict(self.runner_up), "ca_mse": self.runner_up_ca_mse},
            "margin": self.margin,
        }


def ca_mse_table(report: dict, base_patch: int, cost: Callable[[Setting], float] | None = None) -> dict:
    """Setting -> CA-MSE (whole model) for each strategy of `report` and for full input.

    `cost(setting)` gives the relative cost c; by default the report's own `ca_mse` (measured cost).
    """
    rows = report["strategies"]
    if not rows:
        raise ConfigError(f"grad-error report of step {report.get('step')} has no strategies")
    table = {Setting(1.0, base_patch): rows[0]["variance_full"]}
    for row in rows:
        setting = setting_of(row)
        if setting == Setting(1.0, base_patch):
            continue
        table[setting] = row["ca_mse"] if cost is None else row["bias_sq"] + cost(setting) * row["variance"]
    return table


def choose(table: dict[Setting, float], allowed: Callable[[Setting], bool] = lambda s: True) -> Choice:
    """The strategy with the lowest CA-MSE among the allowed ones, and the runner-up."""
    # ties go to the least compressed: smaller patch, higher keep, less merging
    ranked = sorted((value, s.patch, -s.keep, s.merge, s) for s, value in table.items() if allowed(s))
    if not ranked:
        raise ValueError("no strategy is allowed")
    best = ranked[0]
    second = ranked[1] if len(ranked) > 1 else None
    return Choice(best[-1], best[0], second[-1] if second else None, second[0] if second else None)


def choose_stage(
    report: dict,
    cost: Callable[[Setting], float],
    base_patch: int,
    previous: Setting | None,
    monotone: bool,
) -> Choice:
    """The adaptive schedule's choice for the next stage: CA-MSE with the run's own step costs
    (`cost`: budget units of a step), never a cheaper step than `previous` when `monotone`."""
    full = cost(Setting(1.0, base_patch))
    table = ca_mse_table(report, base_patch, lambda s: cost(s) / full)
    floor = cost(previous) if previous is not None and monotone else 0.0
    return choose(table, lambda s: cost(s) >= floor - 1e-12)


def plan(reports: list[dict], base_patch: int, cost: str = "measured") -> list[tuple[float, Choice]]:
    """One choice per report, ordered by the progress it was taken at (each one starts a stage)."""
    if cost not in ("measured", "flops"):
        raise ConfigError(f"--cost {cost!r}: expected measured or flops")
    stages = []
    for report in sorted(reports, key=lambda r: r["progress"]):
        flops = {setting_of(r): r["flops"] for r in report["strategies"]}

        def by_flops(s: Setting, flops: dict = flops) -> float:
            return flops[s]

        stages.append(
            (
                report["progress"],
                choose(ca_mse_table(report, base_patch, by_flops if cost == "flops" else None)),
            )
        )
    progress = [p for p, _ in stages]
    if len(set(progress)) != len(progress):
        raise ConfigError(f"two reports were taken at the same progress ({progress}); give one per stage")
    return stages


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
    lines = [f"{'from':>6}  {'choice':>10}  {'CA-MSE':>10}  {'runner-up':>10}  {'CA-MSE':>10}  {'margin':>7}"]
    for progress, c in stages:
        up = c.runner_up.label if c.runner_up else "-"
        up_value = f"{c.runner_up_ca_mse:10.3e}" if c.runner_up_ca_mse is not None else f"{'-':>10}"
        margin = f"{c.margin:7.1%}" if c.margin is not None else f"{'-':>7}"
        lines.append(
            f"{progress:6.2f}  {c.setting.label:>10}  {c.ca_mse:10.3e}  {up:>10}  {up_value}  {margin}"
        )
    return "\n".join(lines)
