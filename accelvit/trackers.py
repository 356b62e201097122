"""Experiment trackers (TensorBoard, W&B, MLflow, ... through accelerate) that mirror metrics.jsonl.

`metrics.jsonl` stays the record; a tracker gets the same scalars at the same steps, the resolved
recipe as the run's config, and a grad-error summary at each estimator point. A resumed run continues
the same tracker run: TensorBoard writes into the same folder and drops what was logged after the
checkpoint (`purge_step`), W&B and MLflow resume the run id kept in the run directory (they keep what
was logged after the checkpoint; a bit-exact resume logs the same values at those steps again).
MLflow logs into a file store in the run directory unless MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from accelerate import Accelerator

from accelvit.config import Config, to_dict
from accelvit.setting import setting_of

PROJECT = "trackers"  # TensorBoard's events go to RUN_DIR/trackers/
WANDB_ID = "wandb_id"
MLFLOW_ID = "mlflow_id"


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path, step: int) -> None:
    """Open the recipe's trackers for a run at `step` (0: a new run; else a resumed one)."""
    if not cfg.train.log_with:
        return
    init_kwargs = {"tensorboard": {"purge_step": step + 1}} if step else {}
    if "wandb" in cfg.train.log_with:
        init_kwargs["wandb"] = {"id": _wandb_id(run_dir), "resume": "allow", "dir": str(run_dir)}
    mlflow_id = run_dir / MLFLOW_ID
    if "mlflow" in cfg.train.log_with:
        _mlflow_store(run_dir)
        if mlflow_id.is_file():
            init_kwargs["mlflow"] = {"run_id": mlflow_id.read_text().strip()}
    config = _flat(to_dict(cfg)) if step == 0 else None  # a resumed run has its config already
    accelerator.init_trackers(PROJECT, config=config, init_kwargs=init_kwargs)
    if "mlflow" in cfg.train.log_with and accelerator.is_main_process and not mlflow_id.is_file():
        mlflow_id.write_text(accelerator.get_tracker("mlflow").tracker.info.run_id)


def log_scalars(accelerator: Accelerator, record: dict) -> None:
    """The numbers of one metrics.jsonl line, at its step (main process; no-op without trackers)."""
    if accelerator.trackers:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(values, step=record["step"])


def log_grad_report(accelerator: Accelerator, report: dict) -> None:
    """Relative bias, cosine and CA-MSE of each strategy of a grad-error report, at its step."""
    if accelerator.trackers:
        values = {
            f"grad_error/{setting_of(row).label}/{key}": row[key]
            for row in report["strategies"]
            for key in ("relative_bias", "cosine", "ca_mse")
            if row[key] is not None  # the corrected ratios are empty where batch noise swamps them
        }
        accelerator.log(values, step=report["step"])


def finish_trackers(accelerator: Accelerator) -> None:
    """Flush and close the trackers (not accelerate's `end_training`: it ends the process group too)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _mlflow_store(run_dir: Path) -> None:
    """MLflow's runs go to RUN_DIR/trackers/mlruns, a local file store, unless MLFLOW_TRACKING_URI
    says where. MLflow 3 refuses file stores unless asked (it prefers a database server); one folder
    in the run directory is what a run without a server needs."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((run_dir / PROJECT / "mlruns").resolve().as_uri())


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / WANDB_ID
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:8])
    return path.read_text().strip()


def _flat(tree: dict, prefix: str = "") -> dict:
    """model.depth: 6, ...: trackers take flat scalar configs (lists as text)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat
