"""The lookahead criterion: equal budgets per candidate, no trace on the run, gains that follow training.

Adaptive runs that decide by it: tests/test_budgeted_runs.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from accelvit.build import build_model, build_optimizer, flops_cost
from accelvit.checkpoint import create_run_dir, read_metrics
from accelvit.config import ConfigError, load_config
from accelvit.data import load_dataset
from accelvit.lookahead import FORWARD_SHARE, lookahead, lookahead_steps
from accelvit.plan import ca_mse_table, plan
from accelvit.setting import Setting
from accelvit.train import pretrain

FULL, HALF, QUARTER_8 = Setting(1.0, 4), Setting(0.5, 4), Setting(0.25, 8)


def parts(cfg):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, load_dataset(cfg.data)


def test_each_candidate_trains_for_the_same_budget():
    cost = {FULL: 6.0, HALF: 3.1, QUARTER_8: 0.4}.__getitem__
    assert lookahead_steps(cost, [FULL, HALF, QUARTER_8], FULL, 4) == {FULL: 4, HALF: 8, QUARTER_8: 60}
    assert lookahead_steps(cost, [FULL], FULL, 1) == {FULL: 1}
    assert lookahead_steps({FULL: 1.0, HALF: 3.0}.__getitem__, [HALF], FULL, 1) == {HALF: 1}  # at least one


def test_lookahead_leaves_no_trace_is_deterministic_and_counts_its_cost(tiny_recipe):
    cfg = load_config(tiny_recipe, ["schedule.lookahead_steps=2"])
    accelerator, model, optimizer, images = parts(cfg)
    objective = accelerator.unwrap_model(model)
    # give the optimizer a state of its own first: lookahead must put it back too
    views = [torch.rand(8, 3, 16, 16) for _ in range(2)]
    model(views, FULL, 0.5).backward()
    optimizer.step()
    optimizer.zero_grad()
    weights = {k: v.clone() for k, v in objective.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    cost = flops_cost(cfg)

    report = lookahead(cfg, accelerator, model, optimizer, images, [HALF, QUARTER_8], cost, 3, 0.5, 3)

    assert all(torch.equal(v, objective.state_dict()[k]) for k, v in weights.items())
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = lookahead(cfg, accelerator, model, optimizer, images, [HALF, QUARTER_8], cost, 3, 0.5, 3)
    assert [r["lookahead"] for r in again["strategies"]] == [r["lookahead"] for r in report["strategies"]]

    rows = {Setting(r["keep"], r["patch"], r["merge"]): r for r in report["strategies"]}
    steps = {s: r["steps"] for s, r in rows.items()}
    assert steps == lookahead_steps(cost, [FULL, HALF, QUARTER_8], FULL, 2) and steps[QUARTER_8] > steps[HALF] > 2
    forwards = 4 * 3 * 8 * cost(FULL) * FORWARD_SHARE  # before, and after each of the 3 candidates
    assert report["units"] == pytest.approx(sum(n * 8 * cost(s) for s, n in steps.items()) + forwards)
    assert report["batches"] == 3 and report["loss_before"] > 0
    assert all(r["lookahead_se"] > 0 for r in rows.values())
    # plan's lookahead metric ranks minus the gain; rows are per unit cost already
    assert ca_mse_table(report, 4, cost, "lookahead") == {s: -r["lookahead"] for s, r in rows.items()}


def test_a_lookahead_gain_is_zero_without_training_and_moves_with_it(tiny_recipe):
    # training switched off (a vanishing rate): the weights do not move, every gain is exactly 0
    options = ["schedule.lookahead_steps=1"]
    cfg = load_config(tiny_recipe, [*options, "optim.lr=1e-30"])
    accelerator, model, optimizer, images = parts(cfg)
    still = lookahead(cfg, accelerator, model, optimizer, images, [HALF], flops_cost(cfg), 0, 0.5, 2)
    assert [r["lookahead"] for r in still["strategies"]] == [0.0, 0.0]
    # at the recipe's rate the same steps move the held-out loss, each candidate its own way
    cfg = load_config(tiny_recipe, options)
    accelerator, model, optimizer, images = parts(cfg)
    moved = lookahead(cfg, accelerator, model, optimizer, images, [HALF], flops_cost(cfg), 0, 0.5, 2)
    full, half = (r["lookahead"] for r in moved["strategies"])
    assert full != 0 and half != 0 and full != half
    assert moved["loss_before"] == still["loss_before"]  # the same start, the same held-out batches


def test_a_settled_lookahead_reads_the_decrease_after_its_first_steps(tiny_recipe):
    # on full input alone: L0 before, L1 after one step, L2 after two (the same batches each time), so
    # settling half of two steps reads L1 - L2 = 2 (L0 - L2) / 2 - (L0 - L1)
    def gain(*options):
        cfg = load_config(tiny_recipe, list(options))
        accelerator, model, optimizer, images = parts(cfg)
        report = lookahead(cfg, accelerator, model, optimizer, images, [], flops_cost(cfg), 2, 0.5, 2)
        (row,) = report["strategies"]
        return row, report

    one, _ = gain("schedule.lookahead_steps=1")
    two, plain = gain("schedule.lookahead_steps=2")
    settled, report = gain("schedule.lookahead_steps=2", "schedule.lookahead_settle=0.5")
    assert (settled["steps"], settled["settle_steps"], two["settle_steps"]) == (2, 1, 0)
    assert settled["lookahead"] == pytest.approx(2 * two["lookahead"] - one["lookahead"], rel=1e-6)
    assert settled["lookahead"] != pytest.approx(two["lookahead"])
    # one more held-out reading, counted: the forward passes of 2 batches of 8 images at full input
    forward = 2 * 8 * flops_cost(load_config(tiny_recipe, []))(FULL) * FORWARD_SHARE
    assert report["units"] - plain["units"] == pytest.approx(forward)


def test_settling_keeps_at_least_one_step_to_read_over(tiny_recipe):
    cfg = load_config(tiny_recipe, ["schedule.lookahead_steps=1", "schedule.lookahead_settle=0.9"])
    accelerator, model, optimizer, images = parts(cfg)
    report = lookahead(cfg, accelerator, model, optimizer, images, [HALF], flops_cost(cfg), 0, 0.5, 2)
    assert [(r["steps"], r["settle_steps"]) for r in report["strategies"]] == [(1, 0), (2, 1)]
    with pytest.raises(ConfigError, match=r"schedule.lookahead_settle = 1.0: must be in \[0, 1\)"):
        load_config(tiny_recipe, ["schedule.lookahead_settle=1"])


def test_reports_carry_lookahead_for_plan_and_the_run_trains_as_without(tmp_path, tiny_recipe):
    # measuring at 1/2 changes nothing in training: the same losses and the same final weights
    runs = {}
    for name, extra in (("plain", []), ("measured", ["train.grad_error_lookahead=true"])):
        cfg = load_config(tiny_recipe, ["train.grad_error_at=[0.5]", "train.grad_error_batches=2", *extra])
        create_run_dir(tmp_path / name, cfg)
        pretrain(cfg, tmp_path / name)
        runs[name] = tmp_path / name
    losses = {n: [r["loss"] for r in read_metrics(d) if "loss" in r] for n, d in runs.items()}
    assert losses["plain"] == losses["measured"]
    weights = {n: load_file(str(d / "checkpoints/step_6/model.safetensors")) for n, d in runs.items()}
    assert all(torch.equal(weights["plain"][k], weights["measured"][k]) for k in weights["plain"])

    (path,) = (runs["measured"] / "grad_error").glob("step_*.json")
    report = json.loads(path.read_text())
    assert report["lookahead"]["batches"] == 2 and report["lookahead"]["units"] > 0
    assert all({"lookahead", "lookahead_se", "lookahead_full"} <= set(row) for row in report["strategies"])
    ((start, choice),) = plan([report], 4, "flops", "lookahead")
    assert start == report["progress"] and choice.metric == "lookahead"
    table = ca_mse_table(report, 4, None, "lookahead")
    assert choice.setting in table and choice.ca_mse == table[choice.setting]
    (plain,) = (runs["plain"] / "grad_error").glob("step_*.json")
    with pytest.raises(ConfigError, match="train.grad_error_lookahead"):
        plan([json.loads(plain.read_text())], 4, "flops", "lookahead")
