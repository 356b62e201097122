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


TAGS = ("loss", "lr", "keep", "patch", "budget_spent", "feature_std")


def _resumed_run(tmp_path, tiny_recipe, tracker: str, *overrides: str):
    """A run logged to `tracker` that crashed after step 6 was logged, before its checkpoint, and
    resumed from step 3 (so steps 4-6 are logged again); its metrics.jsonl values by step."""
    cfg = load_config(tiny_recipe, [f"train.log_with=[{tracker}]", *overrides])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, {r["step"]: r for r in records if "loss" in r}


def test_tensorboard_holds_the_metrics_values_across_a_resume(tmp_path, tiny_recipe):
    pytest.importorskip("tensorboard")
    run_dir, logged = _resumed_run(tmp_path, tiny_recipe, "tensorboard", "train.grad_error_at=[0.5]")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    folder = run_dir / "trackers"
    for tag in TAGS:
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



def _wandb_history(run_dir) -> dict[int, dict[str, float]]:
    """Each step's logged values, read from the offline runs' .wandb files (a LevelDB-style log of
    protobuf records; the later run's value wins, as a sync would keep it)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    history: dict[int, dict[str, float]] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""  # after the file header
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768  # records do not cross 32 KiB blocks' 7-byte tails
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                pos += left
                continue
            pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last part of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    if "_step" in items:
                        history[int(items.pop("_step"))] = items
    return history


def test_wandb_offline_holds_the_metrics_values_across_a_resume(tmp_path, tiny_recipe, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, logged = _resumed_run(tmp_path, tiny_recipe, "wandb")
    history = _wandb_history(run_dir)
    assert sorted(history) == sorted(logged) == [1, 2, 3, 4, 5, 6]
    for tag in TAGS:
        assert {s: h[tag] for s, h in history.items()} == pytest.approx(
            {s: r[tag] for s, r in logged.items()}, rel=1e-6
        ), tag
    # the resumed half went to the same W&B run: one id, two offline segments
    assert {p.name.rsplit("-", 1)[1] for p in run_dir.glob("wandb/offline-run-*")} == {
        (run_dir / "wandb_id").read_text()
    }


def test_mlflow_holds_the_metrics_values_across_a_resume(tmp_path, tiny_recipe, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run_dir, logged = _resumed_run(tmp_path, tiny_recipe, "mlflow")
    store = run_dir / "trackers" / "mlruns"
    assert store.is_dir()  # a file store inside the run directory
    client = MlflowClient(tracking_uri=store.as_uri())
    run_id = (run_dir / "mlflow_id").read_text()
    assert client.get_run(run_id).data.params["model.depth"] == "2"  # the resolved recipe
    for tag in TAGS:
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: m.timestamp)
        latest = {m.step: m.value for m in history}  # the resumed run logs steps 4-6 again
        assert latest == pytest.approx({s: r[tag] for s, r in logged.items()}, rel=1e-6), tag
    experiments = client.search_experiments()
    assert [len(client.search_runs([e.experiment_id])) for e in experiments if e.name == "trackers"] == [1]
