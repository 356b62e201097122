"""Experiment trackers through accelerate: TensorBoard holds what metrics.jsonl holds, across a resume."""

from __future__ import annotations

import json
import shutil

import pytest

from accelvit.checkpoint import create_run_dir
from accelvit.cli import main
from accelvit.config import load_config
from accelvit.train import pretrain


def _scalars(folder, tag: str) -> dict[int, float]:
    """tag's values by step, read with TensorBoard's own reader (which drops purged steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_holds_the_metrics_values_across_a_resume(tmp_path, tiny_recipe):
    pytest.importorskip("tensorboard")
    cfg = load_config(tiny_recipe, ["train.log_with=[tensorboard]", "train.grad_error_at=[0.5]"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    # a crash after step 6 was logged but before its checkpoint: resume from step 3 logs 4-6 again
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    folder = run_dir / "trackers"
    for tag in ("loss", "lr", "keep", "patch", "budget_spent", "feature_std"):
        values = _scalars(folder, tag)
        assert sorted(values) == [1, 2, 3, 4, 5, 6], tag  # no step twice, none lost
        assert values == pytest.approx({s: r[tag] for s, r in logged.items()}, rel=1e-6), tag
    ca_mse = _scalars(folder, "grad_error/0.5:8/ca_mse")  # the estimator's point at step 3
    report = json.loads((run_dir / "grad_error/step_3.json").read_text())
    row = next(r for r in report["strategies"] if (r["keep"], r["patch"]) == (0.5, 8))
    assert ca_mse == pytest.approx({3: row["ca_mse"]}, rel=1e-6)


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_written(tmp_path, tiny_recipe, capsys):
    pytest.importorskip("tensorboard")
    if __import__("importlib.util").util.find_spec("aim") is not None:
        pytest.skip("aim is installed here")
    out = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(out), "--set", "train.log_with=[tensorboard, aim]"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "accelvit: error: train.log_with = ['tensorboard', 'aim']: aim is not installed "
        "(pip install aim; TensorBoard: pip install 'accelvit[tensorboard]')\n"
    )
    assert not out.exists()
