"""What a run logs: the metrics record of a log line, JSONL files, and the console progress bar.

`metrics.jsonl` is the run's source of truth (tests and users read it directly); the progress bar
only shows the latest record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from accelvit.budget import VitShape, progress_of, tokens_per_view
from accelvit.checkpoint import TrainState
from accelvit.config import TrainConfig
from accelvit.setting import Setting


class Meter:
    """Loss and timing accumulated between two log lines; `partial` (a checkpoint's) continues one."""

    def __init__(self, partial: dict | None = None) -> None:
        self.start = time.perf_counter()
        partial = partial or {}
        self.loss_sum: torch.Tensor | float = partial.get("loss_sum", 0.0)
        self.steps: torch.Tensor | int = partial.get("steps", 0)  # not skipped
        self.images = partial.get("images", 0)
        self.data_s = 0.0

    def partial(self, accelerator: Accelerator) -> dict:
        """What a checkpoint keeps of the log line in progress (every process must call it)."""
        loss = accelerator.reduce(torch.as_tensor(self.loss_sum, dtype=torch.float32), "mean").item()
        return {"loss_sum": loss, "steps": int(self.steps), "images": self.images}

    def add(self, loss: torch.Tensor, images: int, ok: torch.Tensor) -> None:
        """Count a step's loss unless `ok` (a device flag, read at the log step) says it was skipped."""
        self.loss_sum = self.loss_sum + torch.where(ok, loss.float(), 0.0)
        self.steps = self.steps + ok.long()
        self.images += images

    def rates(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {
            "images_per_s": self.images / wall,
            "data_s": round(self.data_s, 4),
            "step_s": round(wall - self.data_s, 4),
        }


def log_record(
    accelerator: Accelerator,
    meter: Meter,
    state: TrainState,
    train: TrainConfig,
    lr: float,
    setting: Setting,
    shape: VitShape,
    monitors: dict[str, torch.Tensor],
) -> dict:
    """One line of metrics.jsonl; the loss is the mean over processes and over the steps since the
    last line that were not skipped (null if all were); the collapse monitors are the last step's,
    averaged over processes. Every process must call it (it reduces across them)."""
    steps = int(meter.steps)
    loss_sum = torch.as_tensor(meter.loss_sum, device=accelerator.device)
    loss = accelerator.reduce(loss_sum, "mean").item() / steps if steps else None
    extra = {"estimator_spent": state.estimator_spent, "skipped": state.skipped, "bad_files": state.bad_files}
    return {
        "step": state.step,
        "progress": round(progress_of(train, state.step, state.budget_spent), 6),
        "loss": loss,
        "lr": lr,
        "keep": round(setting.keep, 6),
        "patch": setting.patch,
        "merge": round(setting.merge, 6),
        "tokens": tokens_per_view(shape, setting),
        "budget_spent": state.budget_spent,
        **{k: v for k, v in extra.items() if v},
        **meter.rates(),
        **_reduced(accelerator, monitors),
    }


def _reduced(accelerator: Accelerator, monitors: dict[str, torch.Tensor]) -> dict[str, float]:
    if not monitors:
        return {}
    values = accelerator.reduce(torch.stack(list(monitors.values())).float(), "mean").tolist()
    return {k: round(v, 6) for k, v in zip(monitors, values, strict=True)}


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


_BUDGET_BAR = "{l_bar}{bar}| {n:.1f}/100% of budget [{elapsed}<{remaining}{postfix}]"


def progress_bar(train: TrainConfig, state: TrainState, main: bool) -> tqdm:
    """Steps, or percent of the budget for a budgeted run; shown on the main process only."""
    if train.budget is None:
        return tqdm(total=train.steps, initial=state.step, disable=not main, unit="step", dynamic_ncols=True)
    done = round(100 * progress_of(train, state.step, state.budget_spent), 2)
    return tqdm(
        total=100, initial=done, disable=not main, unit="%", dynamic_ncols=True, bar_format=_BUDGET_BAR
    )


def advance(bar: tqdm, train: TrainConfig, state: TrainState) -> None:
    if train.budget is None:
        bar.update(1)
    else:
        bar.update(round(100 * progress_of(train, state.step, state.budget_spent), 2) - bar.n)


def show(bar: tqdm, record: dict, setting: Setting) -> None:
    """The latest record beside the bar."""
    bar.set_postfix(
        loss="skipped" if record["loss"] is None else f"{record['loss']:.4f}",
        keep=f"{setting.keep:.2f}",
        patch=setting.patch,
        **({"merge": f"{setting.merge:.2f}"} if setting.merge else {}),
        img_s=f"{record['images_per_s']:.0f}",
    )
