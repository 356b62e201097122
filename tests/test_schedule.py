from __future__ import annotations

import math

import pytest

from accelvit.config import OptimConfig, RampConfig, ScheduleConfig
from accelvit.schedule import lr_at, ramp_value, setting_at
from accelvit.setting import Setting, allowed_patch_sizes, snap_patch


@pytest.mark.parametrize(
    ("ramp", "progress", "expected"),
    [
        (RampConfig("constant", 0.5), 0.7, 0.5),
        (RampConfig("linear", 0.25, 1.0), 0.0, 0.25),
        (RampConfig("linear", 0.25, 1.0), 0.5, 0.625),
        (RampConfig("linear", 0.25, 1.0), 1.0, 1.0),
        (RampConfig("cosine", 0.25, 1.0), 0.0, 0.25),
        (RampConfig("cosine", 0.25, 1.0), 0.5, 0.625),
        (RampConfig("cosine", 0.25, 1.0), 0.25, 1.0 + (0.25 - 1.0) * 0.5 * (1 + math.cos(math.pi / 4))),
        (RampConfig("cosine", 0.25, 1.0), 1.0, 1.0),
        (RampConfig("step", points=[[0.0, 0.25], [0.5, 0.5], [0.75, 1.0]]), 0.49, 0.25),
        (RampConfig("step", points=[[0.0, 0.25], [0.5, 0.5], [0.75, 1.0]]), 0.5, 0.5),
        (RampConfig("step", points=[[0.0, 0.25], [0.5, 0.5], [0.75, 1.0]]), 0.99, 1.0),
        (RampConfig("step", points=[[0.3, 0.5], [0.6, 1.0]]), 0.1, 0.5),
    ],
)
def test_ramp_shapes(ramp, progress, expected):
    assert ramp_value(ramp, progress) == pytest.approx(expected, abs=1e-12)


def test_null_start_takes_default_and_end_defaults_to_start():
    assert ramp_value(RampConfig("linear", None, None), 0.3, default=4) == 4
    assert ramp_value(RampConfig("linear", 2.0, None), 0.3) == 2.0


def test_allowed_patch_sizes_are_divisors_above_base():
    assert allowed_patch_sizes(32, 4) == [4, 8, 16, 32]
    assert allowed_patch_sizes(28, 4) == [4, 7, 14, 28]
    assert allowed_patch_sizes(224, 16) == [16, 28, 32, 56, 112, 224]


@pytest.mark.parametrize(
    ("value", "expected"), [(4.0, 4), (5.9, 4), (6.0, 4), (6.1, 8), (11.9, 8), (12.1, 16), (40, 32)]
)
def test_patch_snaps_to_nearest_allowed_size(value, expected):
    assert snap_patch(value, [4, 8, 16, 32]) == expected


def test_setting_at_ramps_both_knobs_and_snaps():
    cfg = ScheduleConfig(keep=RampConfig("linear", 0.25, 1.0), patch=RampConfig("linear", 16, 4))
    assert setting_at(cfg, 0.0, 32, 4) == Setting(0.25, 16)
    assert setting_at(cfg, 0.5, 32, 4) == Setting(0.625, 8)  # 10 snaps to 8
    assert setting_at(cfg, 1.0, 32, 4) == Setting(1.0, 4)


def test_setting_is_pure():
    cfg = ScheduleConfig(keep=RampConfig("cosine", 0.3, 1.0), patch=RampConfig("linear", 8, 4))
    assert [setting_at(cfg, p / 7, 32, 4) for p in range(8)] == [
        setting_at(cfg, p / 7, 32, 4) for p in range(8)
    ]


def test_lr_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup=0.2)
    assert lr_at(cfg, 0.1) == pytest.approx(0.5)
    assert lr_at(cfg, 0.2) == pytest.approx(1.0)
    assert lr_at(cfg, 0.6) == pytest.approx(0.55)
    assert lr_at(cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(OptimConfig(lr=1.0, warmup=0.0), 0.0) == pytest.approx(1.0)


def test_random_shape_draws_by_weight_from_seed_and_step():
    cfg = ScheduleConfig(patch=RampConfig("random", choices=[4, 8, 16], weights=[1, 2, 1]))
    draws = [setting_at(cfg, 0.5, 32, 4, step=step, seed=0).patch for step in range(4000)]
    shares = [draws.count(p) / len(draws) for p in (4, 8, 16)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    again = [setting_at(cfg, 0.9, 32, 4, step=step, seed=0).patch for step in range(4000)]
    assert again == draws  # a function of (seed, step): a resumed run redraws the same sizes
    other = [setting_at(cfg, 0.5, 32, 4, step=step, seed=1).patch for step in range(4000)]
    assert other != draws
    both = ScheduleConfig(
        keep=RampConfig("random", choices=[0.5, 1.0]), patch=RampConfig("random", choices=[4, 8])
    )
    pairs = {(s.keep, s.patch) for s in (setting_at(both, 0.0, 32, 4, step=i) for i in range(200))}
    assert pairs == {(0.5, 4), (0.5, 8), (1.0, 4), (1.0, 8)}  # the knobs draw independently


def test_random_run_resumes_bit_exactly_and_its_budget_counts_each_draw(tmp_path, tiny_recipe):
    import json
    import shutil

    from accelvit.backbone import build_backbone, vit_shape
    from accelvit.budget import flops_cost_fn, simulate
    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.objectives import OBJECTIVES
    from accelvit.train import pretrain

    cfg = load_config(
        tiny_recipe, ["schedule.keep=1.0", "schedule.patch={shape: random, choices: [4, 8], weights: [1, 1]}"]
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)

    def records() -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    first = records()
    shape = vit_shape(build_backbone(cfg.model), 16)
    branches = OBJECTIVES["simclr"].branches(cfg.objective, cfg.model, "query")
    rows = simulate(cfg, shape, flops_cost_fn(shape, branches, 4), cfg.train.batch_size)
    assert [r["patch"] for r in first] == [row.setting.patch for row in rows]
    assert {r["patch"] for r in first} == {4, 8}
    spent = [sum(row.units for row in rows[: i + 1]) * cfg.train.batch_size for i in range(len(rows))]
    assert [r["budget_spent"] for r in first] == pytest.approx(spent)

    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)
    assert [(r["patch"], r["loss"]) for r in records()] == [(r["patch"], r["loss"]) for r in first]
