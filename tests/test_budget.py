from __future__ import annotations

import pytest

from accelvit.budget import (
    Branch,
    VitShape,
    flops_cost_fn,
    forward_flops,
    mean_cost,
    progress_of,
    relative_cost,
    sample_rows,
    simulate,
    step_flops_cost,
    table_cost_fn,
    tokens_per_view,
)
from accelvit.config import Config, ModelConfig, RampConfig, ScheduleConfig, TrainConfig
from accelvit.objectives import OBJECTIVES
from accelvit.setting import Setting, kept_patches

SHAPE = VitShape(image_size=32, embed_dim=192, depth=12)


@pytest.mark.parametrize(
    ("patches", "keep", "expected"),
    [(64, 1.0, 64), (64, 0.25, 16), (64, 0.3, 19), (49, 0.5, 24), (4, 0.01, 1), (196, 0.75, 147)],
)
def test_kept_patches_rounds_and_keeps_one(patches, keep, expected):
    assert kept_patches(patches, keep) == expected


@pytest.mark.parametrize(
    ("setting", "tokens"),
    [
        (Setting(1.0, 4), 65),
        (Setting(0.5, 4), 33),
        (Setting(1.0, 8), 17),
        (Setting(0.25, 8), 5),
        (Setting(0.1, 32), 2),
    ],
)
def test_tokens_per_view(setting, tokens):
    assert tokens_per_view(SHAPE, setting) == tokens


def test_flops_formula_on_a_hand_count():
    shape = VitShape(image_size=8, embed_dim=2, depth=1, mlp_ratio=4, in_chans=1)
    # 4 patches of 4x4 -> 5 tokens; embed 2*4*16*2 = 256; block (8+16)*5*4 + 4*25*2 = 680
    assert forward_flops(shape, Setting(1.0, 4)) == 256 + 680


def test_relative_cost_falls_with_compression():
    assert relative_cost(SHAPE, Setting(1.0, 4), 4) == 1.0
    quarter = relative_cost(SHAPE, Setting(0.25, 4), 4)
    assert 0.25 < quarter < 0.3  # patch embedding still runs on every patch
    # 2x patch and keep 1/4 give the same 17 tokens; the embedding costs the same per pixel.
    assert relative_cost(SHAPE, Setting(1.0, 8), 4) == pytest.approx(quarter)
    assert relative_cost(SHAPE, Setting(0.25, 8), 4) < quarter


def _config(schedule: ScheduleConfig, **train) -> Config:
    return Config(
        model=ModelConfig(image_size=32, patch_size=4), schedule=schedule, train=TrainConfig(**train)
    )


SIMCLR = [Branch(views=2, size=32, backward=True, drops_tokens=True)]


def test_simulated_steps_and_mean_cost():
    cfg = _config(ScheduleConfig(keep=RampConfig("step", points=[[0.0, 0.25], [0.5, 1.0]])), steps=100)
    rows = simulate(cfg, SHAPE, flops_cost_fn(SHAPE, SIMCLR, 4), global_batch=8)
    assert len(rows) == 100
    picks = sample_rows(rows, 3)
    assert [r.step for r in picks] == [0, 50, 99]
    assert [r.setting.keep for r in picks] == [0.25, 1.0, 1.0]
    quarter = relative_cost(SHAPE, Setting(0.25, 4), 4)
    assert mean_cost(rows) == pytest.approx((quarter + 1.0) / 2)


def test_step_cost_counts_views_backward_and_momentum_passes():
    full = Setting(1.0, 4)
    # SimCLR: 2 views, forward + backward (3 forwards each) -> 6 units per image at full input
    assert step_flops_cost(SHAPE, SIMCLR, full, 4) == pytest.approx(6.0)
    quarter = Setting(0.25, 4)
    assert step_flops_cost(SHAPE, SIMCLR, quarter, 4) == pytest.approx(6 * relative_cost(SHAPE, quarter, 4))
    # MoCo-v3: the key encoder's 2 views are forward only and keep their tokens
    model = ModelConfig(image_size=32, patch_size=4)
    cfg = Config(model=model).objective
    mocov3 = OBJECTIVES["mocov3"].branches(cfg, model, "query")
    assert step_flops_cost(SHAPE, mocov3, full, 4) == pytest.approx(8.0)
    assert step_flops_cost(SHAPE, mocov3, quarter, 4) == pytest.approx(
        6 * relative_cost(SHAPE, quarter, 4) + 2
    )
    # DINO with 2 local crops of 12 px: those cost (13/65 tokens of the global view), forward + backward
    cfg.local_crops, cfg.local_crop_size = 2, 12
    dino = OBJECTIVES["dino"].branches(cfg, model, "query")
    local = forward_flops(VitShape(12, 192, 12), full) / forward_flops(SHAPE, full)
    assert step_flops_cost(SHAPE, dino, full, 4) == pytest.approx(8.0 + 2 * 3 * local)


def test_budget_run_with_keep_half_takes_about_twice_the_steps():
    budget = 6.0 * 64 * 100  # 100 uncompressed SimCLR steps of 64 images
    cost = flops_cost_fn(SHAPE, SIMCLR, 4)
    full = simulate(_config(ScheduleConfig(keep=RampConfig(start=1.0)), budget=budget), SHAPE, cost, 64)
    half = simulate(_config(ScheduleConfig(keep=RampConfig(start=0.5)), budget=budget), SHAPE, cost, 64)
    assert len(full) == 100
    assert 1.9 < len(half) / len(full) < 2.1
    assert half[-1].progress < 1 <= (half[-1].step + 1) * half[-1].units * 64 / budget


def test_progress_follows_the_budget_or_the_steps():
    assert progress_of(TrainConfig(steps=10), 5, 123.0) == 0.5
    assert progress_of(TrainConfig(budget=200.0), 5, 50.0) == 0.25
    assert progress_of(TrainConfig(budget=200.0), 5, 300.0) == 1.0


def test_measured_cost_table_interpolates_in_keep():
    table = [
        {"keep": 0.25, "patch": 4, "units": 1.0},
        {"keep": 1.0, "patch": 4, "units": 4.0},
        {"keep": 0.5, "patch": 4, "units": 2.0},
        {"keep": 1.0, "patch": 8, "units": 1.5},
    ]
    cost = table_cost_fn(table)
    assert cost(Setting(0.5, 4)) == 2.0
    assert cost(Setting(0.75, 4)) == pytest.approx(3.0)
    assert cost(Setting(0.125, 4)) == pytest.approx(0.5)  # extrapolated along the first segment
    assert cost(Setting(0.3, 8)) == 1.5  # one measured keep: constant
    with pytest.raises(ValueError, match="patch 16 was not measured"):
        cost(Setting(1.0, 16))
