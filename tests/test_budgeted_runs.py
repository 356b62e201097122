"""Runs that train for a compute budget, with costs from FLOPs or timings, and the adaptive schedule."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from accelvit.build import flops_cost
from accelvit.checkpoint import create_run_dir
from accelvit.config import ConfigError, load_config
from accelvit.lookahead import FORWARD_SHARE
from accelvit.setting import Setting, parse_strategies
from accelvit.train import pretrain

# One uncompressed SimCLR step of the tiny recipe costs 6 units per image (2 views, forward + backward).
FULL_STEP = 6.0 * 8
FULL = Setting(1.0, 4)


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def run(tmp_path, recipe, overrides, name="run"):
    cfg = load_config(recipe, ["train.steps=null", *overrides])
    run_dir = tmp_path / name
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    return cfg, run_dir


def test_keep_half_performs_about_twice_the_steps_of_keep_one(tmp_path, tiny_recipe):
    budget = [f"train.budget={10 * FULL_STEP}", "schedule.patch=4"]
    _, full = run(tmp_path, tiny_recipe, [*budget, "schedule.keep=1.0"], "full")
    _, half = run(tmp_path, tiny_recipe, [*budget, "schedule.keep=0.5"], "half")
    full_log, half_log = records(full), records(half)
    assert len(full_log) == 10
    assert full_log[-1]["budget_spent"] == pytest.approx(10 * FULL_STEP)
    # 16 patches: keep 0.5 leaves 9 of 17 tokens, so a step costs a bit more than half
    assert 17 <= len(half_log) <= 20
    assert half_log[-1]["budget_spent"] >= 10 * FULL_STEP > half_log[-2]["budget_spent"]
    assert [r["progress"] for r in half_log] == sorted(r["progress"] for r in half_log)
    assert half_log[-1]["progress"] == 1.0


def test_poly_learning_rate_follows_budget_progress(tmp_path, tiny_recipe):
    _, run_dir = run(
        tmp_path,
        tiny_recipe,
        [f"train.budget={8 * FULL_STEP}", "schedule.keep=1.0", "schedule.patch=4", "optim.decay=poly",
         "optim.warmup=0.0"],
    )  # fmt: skip
    log = records(run_dir)
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * (1 - (i + 1) / 8) ** 2 for i in range(8)])


def test_measured_costs_are_timed_and_stored(tmp_path, tiny_recipe):
    cfg, run_dir = run(tmp_path, tiny_recipe, [f"train.budget={6 * FULL_STEP}", "cost.model=measured"])
    costs = json.loads((run_dir / "costs.json").read_text())["costs"]
    assert {c["patch"] for c in costs} == {4, 8}  # the ones the tiny schedule uses
    assert {c["keep"] for c in costs} == {0.25, 0.5, 0.75, 1.0}
    assert all(c["units"] > 0 for c in costs)
    assert records(run_dir)[-1]["budget_spent"] >= 6 * FULL_STEP


def test_a_run_counts_its_stored_costs_and_resumes_with_them(tmp_path, tiny_recipe):
    # Costs as a timing would leave them in the run (fixed here, so the step count is known):
    # 4 units per image at patch 4, 1 at patch 8, whatever the keep.
    cfg = load_config(tiny_recipe, ["train.steps=null", f"train.budget={20 * 8}", "cost.model=measured",
                                    "train.checkpoint_every=1"])  # fmt: skip
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    table = [{"keep": k, "patch": p, "units": 4.0 if p == 4 else 1.0} for p in (4, 8) for k in (0.25, 1.0)]
    (run_dir / "costs.json").write_text(json.dumps({"device": "cpu", "costs": table}))
    pretrain(cfg, run_dir)
    uninterrupted = records(run_dir)
    # patch 8 (1 unit) until half the budget (80 units = 10 steps of 8 images), then patch 4 (4 units)
    assert [r["patch"] for r in uninterrupted] == [8] * 10 + [4] * 3
    assert [r["budget_spent"] for r in uninterrupted] == [8.0 * i for i in range(1, 11)] + [
        112.0,
        144.0,
        176.0,
    ]
    shutil.rmtree(run_dir / "checkpoints/step_13")
    pretrain(cfg, run_dir, resume=True)
    assert records(run_dir) == [
        {**r, **{k: records(run_dir)[i][k] for k in ("images_per_s", "data_s", "step_s")}}
        for i, r in enumerate(uninterrupted)
    ]


ADAPTIVE = [
    f"train.budget={12 * FULL_STEP}",
    "schedule.mode=adaptive",
    "schedule.stages=[0.0, 0.5]",
    "schedule.candidates=0.5:4,0.25:8",
    "schedule.adaptive_batches=2",
    "train.checkpoint_every=2",
]


def test_adaptive_run_decides_logs_and_resumes_bit_exactly_across_a_decision(tmp_path, tiny_recipe):
    cfg, run_dir = run(tmp_path, tiny_recipe, ADAPTIVE)
    decisions = decisions_of(run_dir)
    assert [d["stage"] for d in decisions] == [0.0, 0.5]
    assert decisions[0]["step"] == 0 and decisions[1]["progress"] >= 0.5
    for d in decisions:
        assert (d["keep"], d["patch"]) in {(1.0, 4), (0.5, 4), (0.25, 8)}
        assert d["runner_up"] is not None and d["ca_mse"] <= d["runner_up"]["ca_mse"]
        # the estimator ran 2 batches of 8 images at full input and at both candidates
        assert d["estimator_units"] > 2 * 8 * 6.0
    log = records(run_dir)
    settings = [(r["keep"], r["patch"]) for r in log]
    first = decisions[1]["step"]
    assert set(settings[:first]) == {(decisions[0]["keep"], decisions[0]["patch"])}
    assert set(settings[first:]) == {(decisions[1]["keep"], decisions[1]["patch"])}
    # the second decision never compresses more than the first (monotone)
    costs = {(1.0, 4): 3, (0.5, 4): 2, (0.25, 8): 1}
    assert (
        costs[(decisions[1]["keep"], decisions[1]["patch"])]
        >= costs[(decisions[0]["keep"], decisions[0]["patch"])]
    )
    assert log[-1]["estimator_spent"] == pytest.approx(sum(d["estimator_units"] for d in decisions))
    assert_resumes_across(cfg, run_dir, decisions, first)


def decisions_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "schedule_decisions.jsonl").read_text().splitlines()]


def assert_resumes_across(cfg, run_dir, decisions: list[dict], step: int) -> None:
    """Resumed from the checkpoint just before the decision at `step` (checkpoints every 2 steps),
    the run takes it again, identically, and ends with the same log and weights, bit for bit."""
    log = records(run_dir)
    final = load_file(str(run_dir / f"checkpoints/step_{log[-1]['step']}/model.safetensors"))
    before = max(s for s in range(0, step + 1, 2) if s > 0)
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name[5:]) > before:
            shutil.rmtree(path)
    pretrain(cfg, run_dir, resume=True)
    assert decisions_of(run_dir) == decisions
    assert [(r["step"], r["loss"], r["budget_spent"]) for r in records(run_dir)] == [
        (r["step"], r["loss"], r["budget_spent"]) for r in log
    ]
    resumed = load_file(str(run_dir / f"checkpoints/step_{log[-1]['step']}/model.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_adaptive_lookahead_run_decides_counts_and_resumes_bit_exactly(tmp_path, tiny_recipe):
    options = [
        f"train.budget={24 * FULL_STEP}", "schedule.mode=adaptive", "schedule.stages=[0.0, 0.5]",
        "schedule.candidates=0.5:4,0.25:8", "schedule.adaptive_batches=2", "schedule.adaptive_metric=lookahead",
        "schedule.lookahead_steps=1", "train.checkpoint_every=2",
    ]  # fmt: skip
    cfg, run_dir = run(tmp_path, tiny_recipe, options)
    decisions = decisions_of(run_dir)
    assert [d["stage"] for d in decisions] == [0.0, 0.5]
    cost = flops_cost(cfg)
    for d in decisions:
        assert d["metric"] == "lookahead"
        measured = {parse_strategies(label)[0]: m for label, m in d["measured"].items()}
        assert d["lookahead_per_cost"] == max(m["lookahead"] for m in measured.values()) or d["tied"]
        # each candidate trained one full-input step's worth; held-out forwards before and after each
        steps = sum(m["steps"] * 8 * cost(s) for s, m in measured.items())
        forwards = (len(measured) + 1) * 2 * 8 * cost(FULL) * FORWARD_SHARE
        assert d["estimator_units"] == pytest.approx(steps + forwards)
    # monotone: the second stage measures only what costs at least the first choice
    first = Setting(decisions[0]["keep"], decisions[0]["patch"])
    assert len(decisions[0]["measured"]) == 3
    assert all(cost(parse_strategies(label)[0]) >= cost(first) for label in decisions[1]["measured"])
    log = records(run_dir)
    assert log[-1]["estimator_spent"] == pytest.approx(sum(d["estimator_units"] for d in decisions))
    assert_resumes_across(cfg, run_dir, decisions, decisions[1]["step"])


def test_adaptive_run_with_the_groups_metric_ranks_in_units_of_full_input_noise(tmp_path, tiny_recipe):
    options = [*ADAPTIVE, "schedule.stages=[0.0]", "schedule.candidates=0.5:4", "schedule.adaptive_metric=groups"]
    _, run_dir = run(tmp_path, tiny_recipe, options)
    (decision,) = [json.loads(line) for line in (run_dir / "schedule_decisions.jsonl").read_text().splitlines()]
    # two settings, so full input is the choice or the runner-up; in these units it scores exactly 1
    scores = {(decision["keep"], decision["patch"]): decision["ca_mse"]}
    scores[(decision["runner_up"]["keep"], decision["runner_up"]["patch"])] = decision["runner_up"]["ca_mse"]
    assert set(scores) == {(1.0, 4), (0.5, 4)} and scores[(1.0, 4)] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="schedule.adaptive_metric"):
        load_config(tiny_recipe, ["schedule.adaptive_metric=raw"])
