"""Run directories and checkpoints: atomic save, verified load, resume.

RUN_DIR/
  recipe.yaml          the resolved recipe; `accelvit pretrain RUN_DIR/recipe.yaml` reproduces the run
  metrics.jsonl        one JSON line per `train.log_every` steps
  grad_error/step_N.*  gradient-bias reports taken during training (`train.grad_error_at`, adaptive stages)
  costs.json           measured step costs (`cost.model: measured`), reused on resume
  schedule_decisions.jsonl  adaptive schedule: one line per stage decision
  checkpoints/step_N/  accelerate's `save_state` (model, optimizer, RNG states of every process)
                       + trainer_state.json (TrainState) + manifest.json (files and sizes)

A checkpoint is written under a temporary name and renamed into place once complete, so a crash
mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from accelvit.config import Config, ConfigError, dump_config
from accelvit.distributed import process_state

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
GRAD_ERROR = "grad_error"
COSTS = "costs.json"
DECISIONS = "schedule_decisions.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Everything the loop needs besides model, optimizer and RNGs: the schedule is a function of it."""

    step: int = 0
    images_seen: int = 0
    budget_spent: float = 0.0  # budget units, training steps and estimator runs together
    estimator_spent: float = 0.0  # the part of budget_spent the adaptive schedule's estimator used
    grad_error_done: list[float] = field(default_factory=list)  # train.grad_error_at points taken
    decisions: list[dict] = field(default_factory=list)  # adaptive schedule, one per stage


def create_run_dir(run_dir: Path, cfg: Config, overwrite: bool = False) -> None:
    """Create RUN_DIR with its resolved recipe; refuse a folder that already holds a run.

    Every process checks, then the main process writes, so all of them fail or none does.
    """
    processes = process_state()
    if (run_dir / RECIPE).exists() and not overwrite:
        raise ConfigError(
            f"run directory '{run_dir}' already holds a run: continue it with "
            f"`accelvit resume {run_dir}`, or pass --overwrite to start over"
        )
    processes.wait_for_everyone()
    if processes.is_main_process:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / RECIPE, dump_config(cfg))
    processes.wait_for_everyone()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("step_") and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of interrupted saves are removed with a warning."""
    folder = run_dir / CHECKPOINTS
    if folder.is_dir():
        for leftover in folder.glob(TMP_PREFIX + "*"):
            warnings.warn(f"removing incomplete checkpoint {leftover}", stacklevel=2)
            shutil.rmtree(leftover, ignore_errors=True)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Write RUN_DIR/checkpoints/step_N atomically on every process; keep the newest `keep`."""
    final = run_dir / CHECKPOINTS / f"step_{state.step}"
    tmp = final.with_name(TMP_PREFIX + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(dataclasses.asdict(state)))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_atomic(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a stop right after a checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> None:
    """Check that every file the manifest lists is there with its recorded size."""
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist or is incomplete (no {MANIFEST})")
    listed = json.loads((path / MANIFEST).read_text())["files"]
    for name, size in listed.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise ConfigError(
                f"checkpoint '{path}' is damaged: {name} has {actual} bytes, manifest says {size}"
            )


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainState:
    """Restore model, optimizer and RNG states from `path`; returns the loop state."""
    verify_checkpoint(path)
    accelerator.load_state(str(path))
    return TrainState(**json.loads((path / STATE).read_text()))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines past `step`, logged after the checkpoint a run resumes from."""
    path = run_dir / METRICS
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(kept))
