from __future__ import annotations

import json

import pytest

from accelvit.cli import main
from accelvit.config import ConfigError, load_config
from accelvit.gradbias import SCHEMA
from accelvit.plan import (
    ca_mse_errors,
    ca_mse_table,
    choose,
    choose_stage,
    plan,
    plan_warnings,
    schedule_from_plan,
)
from accelvit.schedule import setting_at
from accelvit.setting import Setting


def report_at(progress: float, full_variance: float, rows: list[tuple]) -> dict:
    """A hand-made report: rows of (keep, patch, bias_sq, variance, cost, flops)."""
    return {
        "schema": SCHEMA,
        "model": {"patch_size": 4, "image_size": 16},
        "objective": "simclr",
        "batches": 8,
        "step": int(progress * 100),
        "progress": progress,
        "strategies": [
            {
                "keep": keep,
                "patch": patch,
                "bias_sq": bias,
                "variance": var,
                "variance_full": full_variance,
                "cost": cost,
                "flops": flops,
                "ca_mse": bias + cost * var,
            }
            for keep, patch, bias, var, cost, flops in rows
        ],
    }


# Early: variance dominates and the cheapest strategy wins; late: bias dominates and full input wins.
EARLY = report_at(0.0, 10.0, [(0.5, 4, 0.1, 12.0, 0.5, 0.5), (0.25, 8, 0.5, 15.0, 0.1, 0.08)])  # 6.1, 2.0
MIDDLE = report_at(0.5, 2.0, [(0.5, 4, 0.2, 2.2, 0.5, 0.5), (0.25, 8, 3.0, 3.0, 0.1, 0.08)])  # 1.3, 3.3
LATE = report_at(0.75, 0.5, [(0.5, 4, 0.6, 0.6, 0.5, 0.5), (0.25, 8, 3.0, 1.0, 0.1, 0.08)])  # 0.9, 3.1


def test_full_input_is_a_candidate_with_its_own_variance():
    table = ca_mse_table(LATE, base_patch=4)
    assert table == {Setting(1.0, 4): 0.5, Setting(0.5, 4): pytest.approx(0.9), Setting(0.25, 8): 3.1}


def test_choose_gives_the_argmin_and_the_runner_up():
    choice = choose(ca_mse_table(EARLY, 4))
    assert choice.setting == Setting(0.25, 8)
    assert choice.runner_up == Setting(0.5, 4)
    assert choice.margin == pytest.approx(6.1 / 2.0 - 1)
    # only strategies at least as expensive as keep 0.5 allowed (the adaptive schedule's monotone rule)
    assert choose(ca_mse_table(EARLY, 4), lambda s: s != Setting(0.25, 8)).setting == Setting(0.5, 4)


def test_plan_picks_the_argmin_per_stage_in_progress_order():
    stages = plan([LATE, EARLY, MIDDLE], base_patch=4)
    assert [p for p, _ in stages] == [0.0, 0.5, 0.75]
    assert [c.setting for _, c in stages] == [Setting(0.25, 8), Setting(0.5, 4), Setting(1.0, 4)]
    # with analytic FLOPs as the cost, the ranking uses the reports' flops column instead
    flops = plan([EARLY], base_patch=4, cost="flops")[0][1]
    assert flops.ca_mse == pytest.approx(0.5 + 0.08 * 15.0)


def test_plan_refuses_two_reports_of_one_stage():
    with pytest.raises(ConfigError, match="same progress"):
        plan([EARLY, EARLY], base_patch=4)


def test_plan_command_writes_a_schedule_that_a_recipe_validates(tmp_path, tiny_recipe, capsys):
    paths = []
    for name, rep in (("early", EARLY), ("middle", MIDDLE), ("late", LATE)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    out = tmp_path / "plan.yaml"
    assert main(["plan", *map(str, paths), "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "0.25:8" in table and "runner-up" in table
    cfg = load_config(tiny_recipe, [f"schedule.file={out}"])
    got = [setting_at(cfg.schedule, p, 16, 4) for p in (0.0, 0.3, 0.5, 0.7, 0.75, 1.0)]
    assert got == [Setting(0.25, 8)] * 2 + [Setting(0.5, 4)] * 2 + [Setting(1.0, 4)] * 2
    assert schedule_from_plan(plan([EARLY, MIDDLE, LATE], 4))["patch"]["points"] == [
        [0.0, 8],
        [0.5, 4],
        [0.75, 4],
    ]


def test_plan_rejects_a_report_of_another_schema(tmp_path, capsys):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({**EARLY, "schema": "accelvit.grad-error/0"}))
    assert main(["plan", str(bad), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "report schema 'accelvit.grad-error/0'" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_adaptive_stage_choice_uses_the_run_costs_and_the_monotone_rule():
    from accelvit.plan import choose_stage

    # step costs in budget units: full 6, keep 0.5 about 3, keep 0.25 at patch 8 about 0.6
    units = {Setting(1.0, 4): 6.0, Setting(0.5, 4): 3.0, Setting(0.25, 8): 0.6}
    cost = units.__getitem__
    early = choose_stage(EARLY, cost, 4, previous=None, monotone=True)
    assert early.setting == Setting(0.25, 8)
    assert early.ca_mse == pytest.approx(0.5 + 0.1 * 15.0)  # relative cost 0.6 / 6
    # later, with the previous stage at keep 0.5, the cheaper 0.25:8 is out unless monotone is off
    report = report_at(0.5, 10.0, [(0.5, 4, 0.1, 12.0, 0.5, 0.5), (0.25, 8, 0.5, 15.0, 0.1, 0.08)])
    assert choose_stage(report, cost, 4, Setting(0.5, 4), monotone=True).setting == Setting(0.5, 4)
    assert choose_stage(report, cost, 4, Setting(0.5, 4), monotone=False).setting == Setting(0.25, 8)


def with_errors(report: dict, ca_mse_se: float, full_se: float, batches: int = 8) -> dict:
    rows = [
        {**r, "ca_mse_se": ca_mse_se, "bias_sq_se": ca_mse_se, "variance_se": 0.0, "variance_full_se": full_se}
        for r in report["strategies"]
    ]
    return {**report, "strategies": rows, "batches": batches}


def test_candidates_within_noise_are_tied_and_the_tie_rule_decides():
    # MIDDLE: 0.5:4 at 1.3 (measured cost), full input at 2.0, 0.25:8 at 3.3
    clear = choose(ca_mse_table(MIDDLE, 4), errors=ca_mse_errors(with_errors(MIDDLE, 0.1, 0.1), 4))
    assert clear.setting == Setting(0.5, 4) and not clear.within_noise
    noisy = with_errors(MIDDLE, 0.6, 0.6)  # 2.0 - 1.3 < hypot(0.6, 0.6): full input and 0.5:4 tie
    table, errors = ca_mse_table(noisy, 4), ca_mse_errors(noisy, 4)
    tie = choose(table, errors=errors)
    assert tie.tied == (Setting(0.5, 4), Setting(1.0, 4)) and tie.setting == Setting(0.5, 4)  # the lowest
    kept = choose(table, errors=errors, previous=Setting(1.0, 4))
    assert kept.setting == Setting(1.0, 4) and kept.runner_up == Setting(0.5, 4)  # the previous stage's
    assert kept.to_dict()["tied"] == ["0.5:4", "1:4"]


def test_plan_defaults_to_flops_and_warns_about_noise_small_k_negative_bias_and_non_monotone_plans():
    negative = report_at(0.0, 10.0, [(0.5, 4, -0.3, 12.0, 0.5, 0.5), (0.25, 8, 0.5, 15.0, 0.1, 0.08)])
    late = report_at(0.5, 10.0, [(0.5, 4, 0.1, 12.0, 0.5, 0.5), (0.25, 8, 0.5, 1.0, 0.1, 0.08)])
    reports = [with_errors(negative, 0.01, 0.01, batches=2), with_errors(late, 0.01, 0.01)]
    reports[1]["strategies"][0]["bias_sq"] = 5.0  # the second stage goes to the cheaper 0.25:8
    reports[1]["strategies"][0]["ca_mse"] = 11.0
    stages = plan(reports, 4)
    assert stages[0][1].ca_mse == pytest.approx(0.5 + 0.08 * 15.0)  # flops, not the measured 0.1
    warnings = plan_warnings(reports, stages, 4)
    assert any("K = 2 batches gives no standard errors" in w for w in warnings)
    assert any("bias² of 0.5:4 is negative (-0.3 ± 0.01)" in w for w in warnings)
    assert not any("not monotone" in w for w in warnings)  # 0.25:8 twice

    swapped = [with_errors(late, 0.01, 0.01), with_errors(EARLY, 0.01, 0.01)]
    swapped[0]["progress"], swapped[1]["progress"] = 0.0, 0.5  # full input first, then 0.25:8
    swapped[0]["strategies"][1]["bias_sq"] = swapped[0]["strategies"][1]["ca_mse"] = 50.0
    swapped[0]["strategies"][0]["bias_sq"] = swapped[0]["strategies"][0]["ca_mse"] = 50.0
    stages = plan(swapped, 4)
    assert [c.setting for _, c in stages] == [Setting(1.0, 4), Setting(0.25, 8)]
    assert any("not monotone: 0.25:8 from 0.5 is cheaper than 1:4 from 0" in w for w in plan_warnings(swapped, stages, 4))


def test_plan_command_prints_the_warnings(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(with_errors(EARLY, 0.01, 0.01, batches=2)))
    assert main(["plan", str(path), "-o", str(tmp_path / "p.yaml")]) == 0
    assert "warning: report at progress 0: K = 2 batches gives no standard errors" in capsys.readouterr().out


def test_the_groups_metric_weighs_every_parameter_group_alike():
    # (keep, patch, flops) -> group -> (bias_sq, variance); full-input variance 100 in the stem, 1 in the block
    groups = {
        (1.0, 8, 0.25): {"stem": (1.0, 100.0), "block": (1.5, 1.0)},
        (0.5, 4, 0.5): {"stem": (40.0, 100.0), "block": (0.05, 1.0)},
    }
    full = {"stem": 100.0, "block": 1.0}
    rows = [
        {
            "keep": keep, "patch": patch, "cost": flops, "flops": flops,
            "bias_sq": sum(b for b, _ in by.values()), "variance": sum(v for _, v in by.values()),
            "variance_full": sum(full.values()), "ca_mse": 0.0,
            "groups": {g: {"bias_sq": b, "variance": v, "variance_full": full[g], "ca_mse": 0.0} for g, (b, v) in by.items()},
        }
        for (keep, patch, flops), by in groups.items()
    ]  # fmt: skip
    report = {"progress": 0.0, "step": 0, "groups": ["stem", "block"], "strategies": rows}
    flops = {Setting(1.0, 8): 0.25, Setting(0.5, 4): 0.5, Setting(1.0, 4): 1.0}.__getitem__
    # whole model: the stem's raw gradients decide (1:8 at 1 + 0.25 * 100 + 1.5 + 0.25 against 40 + 50 + ...)
    assert choose(ca_mse_table(report, 4, flops)).setting == Setting(1.0, 8)
    table = ca_mse_table(report, 4, flops, "groups")
    assert table == pytest.approx({Setting(1.0, 4): 1.0, Setting(1.0, 8): (0.26 + 1.75) / 2, Setting(0.5, 4): (0.9 + 0.55) / 2})
    assert plan([report], 4, "flops", "groups")[0][1].setting == Setting(0.5, 4)
    units = {Setting(1.0, 8): 1.0, Setting(0.5, 4): 2.0, Setting(1.0, 4): 4.0}.__getitem__  # the run's step costs
    assert choose_stage(report, units, 4, None, monotone=False, metric="groups").setting == Setting(0.5, 4)
    assert choose_stage(report, units, 4, None, monotone=False).setting == Setting(1.0, 8)
    # standard errors in each group's units, summed as if fully correlated (the same batches), over 2 groups
    se = {"stem": (2.0, 10.0), "block": (0.1, 0.2)}  # (ca_mse_se, variance_full_se)
    for row in rows:
        for g, (ca_se, full_se) in se.items():
            row["groups"][g] |= {"ca_mse_se": ca_se, "variance_full_se": full_se}
    errors = ca_mse_errors(report, 4, metric="groups")
    assert errors == pytest.approx({Setting(1.0, 4): (0.1 + 0.2) / 2, Setting(1.0, 8): 0.06, Setting(0.5, 4): 0.06})
    with pytest.raises(ConfigError, match="--metric .raw.: expected one of model, groups, descent"):
        plan([report], 4, "flops", "raw")
    with pytest.raises(ConfigError, match="has no per-group statistics"):
        ca_mse_table({**report, "groups": []}, 4, flops, "groups")


def with_descent(report: dict, full: tuple[float, float], rows: list[tuple[float, float]]) -> dict:
    """`report` with (descent, standard error) for full input and each strategy row."""
    strategies = [
        r | {"descent": d, "descent_se": se, "descent_full": full[0], "descent_full_se": full[1]}
        for r, (d, se) in zip(report["strategies"], rows, strict=True)
    ]
    return report | {"strategies": strategies}


def test_descent_ranks_loss_decrease_per_unit_cost():
    # full input: 1.0 per step; keep 0.5 (cost 0.5): 0.6 -> 1.2 per unit; 0.25:8 (flops 0.08): 0.05 -> 0.625
    report = with_descent(LATE, (1.0, 0.01), [(0.6, 0.01), (0.05, 0.01)])
    table = ca_mse_table(report, 4, metric="descent")
    assert table == pytest.approx({Setting(1.0, 4): -1.0, Setting(0.5, 4): -1.2, Setting(0.25, 8): -0.5})
    (stage,) = plan([report], 4, "flops", "descent")
    choice = stage[1]
    assert choice.setting == Setting(0.5, 4) and choice.runner_up == Setting(1.0, 4)  # 0.25:8: 0.625 by flops
    assert choice.margin == pytest.approx((1.2 - 1.0) / 1.2)  # 17% less descent per unit cost
    decision = choice.to_dict()
    assert decision["metric"] == "descent" and decision["descent_per_cost"] == pytest.approx(1.2)
    assert "ca_mse" not in decision
    # CA-MSE on the same report prefers full input: bias counts as error
    assert plan([report], 4, "flops")[0][1].setting == Setting(1.0, 4)


def test_descent_ties_within_noise_keep_the_previous_choice():
    report = with_descent(LATE, (1.0, 0.2), [(0.55, 0.1), (0.01, 0.01)])  # 1.1 ± 0.2 vs 1.0 ± 0.2
    units = {Setting(1.0, 4): 1.0, Setting(0.5, 4): 0.5, Setting(0.25, 8): 0.1}.__getitem__
    tied = choose_stage(report, units, 4, Setting(1.0, 4), monotone=False, metric="descent")
    assert tied.setting == Setting(1.0, 4) and tied.within_noise
    assert choose_stage(report, units, 4, None, monotone=False, metric="descent").setting == Setting(0.5, 4)


def test_descent_of_a_report_without_it_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^grad-error report of step 75 has no descent: .*--metric model$"):
        plan([LATE], 4, "flops", "descent")
