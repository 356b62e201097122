"""The pretraining loop: one function, read top to bottom.

Per step: read the compression setting and learning rate from progress -> forward/backward the
objective -> optimizer step -> momentum update -> log -> checkpoint. Everything that varies over
training is a pure function of the step, so a checkpoint needs only the step besides the model,
optimizer and RNG states.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from accelvit.backbone import build_backbone, vit_shape
from accelvit.budget import tokens_per_view
from accelvit.checkpoint import (
    GRAD_ERROR,
    METRICS,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from accelvit.config import Config, ConfigError, OptimConfig, allowed_patch_sizes
from accelvit.data import StepBatchSampler, build_loader, load_dataset
from accelvit.distributed import use_cpu
from accelvit.evaluate import evaluate_backbone
from accelvit.gradbias import default_strategies, estimate_model
from accelvit.objectives import OBJECTIVES
from accelvit.report import write_grad_report
from accelvit.schedule import lr_at, parse_strategies, setting_at


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped: bool  # True when a signal ended the run before train.steps


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms, position embeddings and prefix tokens get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the checkpoint
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pretrain(cfg: Config, run_dir: Path, resume: bool = False) -> RunResult:
    """Pretrain the backbone of `cfg` in `run_dir` (created beforehand by `create_run_dir`)."""
    accelerator = Accelerator(mixed_precision=cfg.train.precision, cpu=use_cpu())
    main = accelerator.is_main_process
    steps, image_size, base_patch = cfg.train.steps, cfg.model.image_size, cfg.model.patch_size

    # Model, identical on every process (same seed); DDP keeps it so.
    set_seed(cfg.train.seed)
    objective = OBJECTIVES[cfg.objective.name]
    backbone = build_backbone(cfg.model)
    shape = vit_shape(backbone, image_size)
    model = objective.build(cfg.objective, backbone, cfg.schedule.dropout_views)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume: model, optimizer and every process's RNG state come back from the checkpoint.
    state = TrainState()
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"'{run_dir}' has no complete checkpoint to resume from")
        state = load_checkpoint(accelerator, checkpoint)
        if main:
            truncate_metrics(run_dir, state.step)
            print(f"resuming {run_dir} from step {state.step}", flush=True)
    else:
        set_seed(cfg.train.seed + accelerator.process_index)  # token dropout differs per process

    # Data: a pure function of (seed, step), so the loader starts where the checkpoint stopped.
    world, batch = accelerator.num_processes, cfg.train.batch_size
    images = load_dataset(cfg.data, train=True)
    sampler = StepBatchSampler(
        len(images), batch, cfg.train.seed, state.step, steps, accelerator.process_index, world
    )
    transform = objective.transform(cfg.objective, cfg.model, cfg.data)
    loader = build_loader(images, transform, cfg.data.workers, sampler, accelerator.device.type == "cuda")

    grad_error_steps = {round(p * steps) for p in cfg.train.grad_error_at}
    strategies = (
        parse_strategies(cfg.train.grad_error_strategies)
        if cfg.train.grad_error_strategies
        else default_strategies(base_patch, allowed_patch_sizes(image_size, base_patch))
    )

    stop = StopRequest()
    bar = tqdm(total=steps, initial=state.step, disable=not main, unit="step", dynamic_ncols=True)
    meter = _Meter()
    try:
        batches = iter(loader)
        while state.step < steps:
            # Data (time spent waiting for it is data_s)
            tick = time.perf_counter()
            views, _ = next(batches)
            views = [v.to(accelerator.device, non_blocking=True) for v in views]
            meter.data_s += time.perf_counter() - tick

            # Gradient error of compressed inputs on the current model (train.grad_error_at)
            if state.step in grad_error_steps:
                report = estimate_model(
                    accelerator.unwrap_model(model),
                    cfg,
                    accelerator,
                    strategies,
                    cfg.train.grad_error_batches,
                    state.step,
                )
                if main:
                    write_grad_report(report, run_dir / GRAD_ERROR / f"step_{state.step}.json")

            # Compression setting and learning rate at this point of training
            progress = state.step / steps
            setting = setting_at(cfg.schedule, progress, image_size, base_patch)
            lr = lr_at(cfg.optim, (state.step + 1) / steps)  # +1: the first step must not get lr 0
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Forward, backward, step, momentum
            loss = model(views, setting, progress)
            accelerator.backward(loss)
            if cfg.optim.clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            accelerator.unwrap_model(model).update_momentum(progress)
            state.step += 1
            state.images_seen += batch * world
            meter.add(loss.detach(), batch * world)
            bar.update(1)

            # Log
            if state.step % cfg.train.log_every == 0 or state.step == steps:
                record = {
                    "step": state.step,
                    "progress": round(state.step / steps, 6),
                    "loss": accelerator.reduce(meter.loss_sum, "mean").item() / meter.steps,
                    "lr": lr,
                    "keep": round(setting.keep, 6),
                    "patch": setting.patch,
                    "tokens": tokens_per_view(shape, setting),
                    **meter.rates(),
                }
                meter = _Meter()
                if main:
                    with open(run_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        keep=f"{setting.keep:.2f}",
                        patch=setting.patch,
                        img_s=f"{record['images_per_s']:.0f}",
                    )

            # Evaluate (kNN on the labelled splits, main process)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                if main:
                    backbone = accelerator.unwrap_model(model).backbone
                    result = evaluate_backbone(backbone, cfg.model, cfg.data, cfg.eval, accelerator.device)
                    with open(run_dir / METRICS, "a") as f:
                        f.write(json.dumps({"step": state.step, "knn_top1": result["knn_top1"]}) + "\n")
                    bar.write(f"step {state.step}: kNN top-1 {result['knn_top1']:.4f}")
                accelerator.wait_for_everyone()

            # Checkpoint (and stop, on a signal from any process)
            stopping = _any_process(accelerator, stop.requested)
            if state.step % cfg.train.checkpoint_every == 0 or state.step == steps or stopping:
                path = save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints)
            if stopping and state.step < steps:
                bar.close()
                if main:
                    print(
                        f"stopped at step {state.step}/{steps}; checkpoint {path}\n"
                        f"resume with: accelvit resume {run_dir}",
                        flush=True,
                    )
                return RunResult(run_dir, state.step, stopped=True)
    finally:
        stop.restore()
        bar.close()
    accelerator.wait_for_everyone()
    if main:
        print(
            f"done: {steps} steps, {state.images_seen} images\n"
            f"run: {run_dir}\nmetrics: {run_dir / METRICS}\n"
            f"export the backbone: accelvit export {run_dir} -o backbone.safetensors",
            flush=True,
        )
    return RunResult(run_dir, state.step, stopped=False)


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "max").item())


class _Meter:
    """Loss and timing accumulated between two log lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loss_sum: torch.Tensor | float = 0.0
        self.steps = 0
        self.images = 0
        self.data_s = 0.0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum = self.loss_sum + loss.float()
        self.steps += 1
        self.images += images

    def rates(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {
            "images_per_s": self.images / wall,
            "data_s": round(self.data_s, 4),
            "step_s": round(wall - self.data_s, 4),
        }
