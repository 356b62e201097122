from __future__ import annotations

import pytest

from accelvit.budget import (
    VitShape,
    forward_flops,
    kept_patches,
    mean_cost,
    relative_cost,
    schedule_rows,
    tokens_per_view,
)
from accelvit.config import RampConfig, ScheduleConfig
from accelvit.schedule import Setting

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


def test_schedule_rows_and_mean_cost():
    schedule = ScheduleConfig(keep=RampConfig("step", points=[[0.0, 0.25], [0.5, 1.0]]))
    rows = schedule_rows(schedule, SHAPE, 4, steps=100, rows=3)
    assert [r.step for r in rows] == [0, 50, 100]
    assert [r.setting.keep for r in rows] == [0.25, 1.0, 1.0]
    quarter = relative_cost(SHAPE, Setting(0.25, 4), 4)
    assert mean_cost(schedule, SHAPE, 4, 100) == pytest.approx((quarter + 1.0) / 2)
