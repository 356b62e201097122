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
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from accelvit.augment import batch_views
from accelvit.backbone import build_backbone, vit_shape
from accelvit.budget import flops_cost_fn, progress_of, table_cost_fn, tokens_per_view
from accelvit.build import estimate_at
from accelvit.checkpoint import (
    CHECKPOINTS,
    DECISIONS,
    DIAGNOSTICS,
    GRAD_ERROR,
    METRICS,
    SaveError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    run_identity,
    save_checkpoint,
    truncate_metrics,
    write_atomic,
)
from accelvit.config import Config, ConfigError, OptimConfig, TrainConfig, patch_sizes
from accelvit.data import StepBatchSampler, build_loader, load_dataset
from accelvit.diagnostics import measure_blocks, probe_batch
from accelvit.distributed import any_process, use_cpu
from accelvit.evaluate import evaluate_backbone
from accelvit.monitor import collapse_warning
from accelvit.objectives import OBJECTIVES, buffer_restorer, encoder_name, view_pipeline
from accelvit.plan import choose_stage
from accelvit.report import write_grad_report
from accelvit.schedule import current_setting, due_points, lr_at, weight_decay_at
from accelvit.setting import Setting, setting_of, stem_stride, strategies_or_default
from accelvit.timing import measured_settings, shared_cost_table


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped: bool  # True when a signal ended the run before its end


NO_DECAY = ("pos_embed", "cls_token", "reg_token", "value_lambdas")  # besides every 1-D parameter


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms, position embeddings, prefix tokens and the value-residual mixing scalars
    get no weight decay. The first parameter group is the one that decays (`weight_decay_at`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # value_lambdas is (depth, 2): decay would pull the mixing toward 0, not regularise weights
        skip = param.ndim <= 1 or name.endswith(NO_DECAY)
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    setting: Setting,
    progress: float,
    clip_grad: float | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Forward, backward, and, when loss and gradients are finite on every process, the optimizer step
    and momentum update. Returns (loss, gradient norm, finite); a step that is not finite leaves
    weights and buffers as they were."""
    restore_buffers = buffer_restorer(model)
    loss = model(views, setting, progress)
    accelerator.backward(loss)
    grad_norm = _grad_norm(accelerator, model, clip_grad)
    accelerator.unwrap_model(model).cancel_gradients(progress)  # after clipping, as DINO's reference
    # fp16: gradient overflow is the loss scaler's business (it skips the step itself)
    finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | (precision == "fp16"))
    finite = not any_process(accelerator, not bool(finite))
    if finite:
        optimizer.step()
        accelerator.unwrap_model(model).update_momentum(progress)
    else:
        restore_buffers()  # the forward put NaN into batch-norm statistics (DINO: its centre)
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, finite


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
    train, image_size, base_patch = cfg.train, cfg.model.image_size, cfg.model.patch_size

    # Model, identical on every process (same seed); DDP keeps it so.
    set_seed(train.seed)
    objective = OBJECTIVES[cfg.objective.name]
    backbone = build_backbone(cfg.model)
    shape = vit_shape(backbone, image_size)
    model = objective.build(cfg.objective, backbone, cfg.schedule.dropout_views)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # batch norm in the heads over the global batch, as SimCLR and MoCo-v3 do. (torch syncs it on
        # GPUs only: on CPU each process normalises its own batch; DDP broadcasts rank 0's running
        # statistics at every forward.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume: model, optimizer and every process's RNG state come back from the checkpoint.
    state = TrainState()
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"'{run_dir}' has no complete checkpoint to resume from")
        state = load_checkpoint(accelerator, checkpoint, run_identity(cfg))
        if main:
            truncate_metrics(run_dir, state.step)
            _write_decisions(run_dir, state.decisions)
            print(f"resuming {run_dir} from step {state.step}", flush=True)
    else:
        set_seed(train.seed + accelerator.process_index)  # token dropout differs per process

    # Data: a pure function of (seed, step), so the loader starts where the checkpoint stopped.
    world, batch = accelerator.num_processes, train.batch_size
    images = load_dataset(cfg.data, train=True)
    sampler = StepBatchSampler(
        len(images), batch, train.seed, state.step, train.steps, accelerator.process_index, world
    )
    transform, specs = view_pipeline(cfg)  # specs: views drawn on the device (data.augment: device)
    loader = build_loader(images, transform, cfg.data.workers, sampler, accelerator.device.type == "cuda")
    probe = probe_batch(images, image_size).to(accelerator.device) if train.diagnostics_every else None

    # Costs of a step in budget units per image (the budget's and the adaptive schedule's currency)
    allowed = patch_sizes(cfg.model)
    grad_error_strategies = strategies_or_default(train.grad_error_strategies, base_patch, allowed)
    candidates = [
        s
        for s in strategies_or_default(cfg.schedule.candidates, base_patch, allowed)
        if s != Setting(1.0, base_patch)
    ]
    if cfg.cost.model == "measured":
        measure = measured_settings(cfg, candidates if cfg.schedule.mode == "adaptive" else ())
        table = shared_cost_table(accelerator, model, images, (transform, specs), measure, cfg, run_dir)
        cost = table_cost_fn(table)
    else:
        cost = flops_cost_fn(
            shape, objective.branches(cfg.objective, cfg.model, cfg.schedule.dropout_views), base_patch
        )

    stop = StopRequest()
    bar = _progress_bar(train, state, main)
    meter = _Meter()
    warned = False  # a collapse warning is printed once a run
    try:
        batches = iter(loader)
        while not _finished(train, state):
            progress = progress_of(train, state.step, state.budget_spent)

            # Data (time spent waiting for it is data_s)
            tick = time.perf_counter()
            loaded, _, bad = next(batches)
            rank = accelerator.process_index
            views = batch_views(loaded, specs, train.seed, state.step, rank, accelerator.device)
            meter.data_s += time.perf_counter() - tick
            _check_bad_files(bad, cfg.data.on_bad_file, state, main)

            # Attention diagnostics on the fixed probe batch (train.diagnostics_every)
            if main and train.diagnostics_every and state.step % train.diagnostics_every == 0:
                blocks = measure_blocks(accelerator.unwrap_model(model).backbone, probe)
                with open(run_dir / DIAGNOSTICS, "a") as f:
                    f.write(json.dumps({"step": state.step, "progress": progress, "blocks": blocks}) + "\n")

            # Gradient error of compressed inputs on the current model (train.grad_error_at)
            for point in due_points(train.grad_error_at, progress, state.grad_error_done):
                report = estimate_at(
                    accelerator.unwrap_model(model), cfg, accelerator, grad_error_strategies,
                    train.grad_error_batches, state.step, progress, images,
                )  # fmt: skip
                state.grad_error_done.append(point)
                if main:
                    write_grad_report(report, run_dir / GRAD_ERROR / f"step_{state.step}.json")

            # Adaptive schedule: at each stage, measure the candidates and switch to the best one
            if cfg.schedule.mode == "adaptive":
                done = [d["stage"] for d in state.decisions]
                for stage in due_points(cfg.schedule.stages, progress, done):
                    decision = _decide(
                        cfg, accelerator, model, images, candidates, cost, state, stage, progress
                    )
                    if main:
                        _write_decisions(run_dir, state.decisions)
                        bar.write(
                            f"stage {stage:g} (step {state.step}): {setting_of(decision).label} "
                            f"(keep:patch[:merge], CA-MSE {decision['ca_mse']:.3e})"
                        )

            # Compression setting and learning rate at this point of training
            setting = current_setting(
                cfg.schedule, progress, image_size, base_patch, state.decisions, stem_stride(cfg.model.stem),
                state.step, train.seed,
            )  # fmt: skip
            step_units = cost(setting) * batch * world
            # the learning rate of the progress reached by this step: the first step must not get lr 0
            reached = progress_of(train, state.step + 1, state.budget_spent + step_units)
            lr = lr_at(cfg.optim, reached)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(cfg.optim, progress)

            # Forward, backward, step, momentum; a non-finite loss or gradient skips the step or stops
            loss, grad_norm, finite = train_step(
                accelerator, model, optimizer, views, setting, progress, cfg.optim.clip_grad, train.precision
            )
            if finite:
                state.skipped_in_row = 0
            else:
                # stopping checkpoints the state before this step: the counters move only after
                if train.on_nonfinite == "stop" or state.skipped_in_row + 1 >= train.max_skipped:
                    _stop_nonfinite(accelerator, run_dir, state, train, cfg, loss, grad_norm)
                state.skipped += 1
                state.skipped_in_row += 1
            state.step += 1
            state.images_seen += batch * world
            state.budget_spent += step_units
            if finite:
                meter.add(loss.detach(), batch * world)
            _advance(bar, train, state)

            # Log
            if state.step % train.log_every == 0 or _finished(train, state):
                record = _log_record(accelerator, meter, state, train, lr, setting, shape)
                record.update(_monitors(accelerator, accelerator.unwrap_model(model).monitors))
                meter = _Meter()
                warning = collapse_warning(record, shape.embed_dim) if record["progress"] >= 0.1 else None
                if main and warning and not warned:
                    bar.write(f"warning: {warning}")
                    warned = True
                if main:
                    with open(run_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(
                        loss="skipped" if record["loss"] is None else f"{record['loss']:.4f}",
                        keep=f"{setting.keep:.2f}",
                        patch=setting.patch,
                        **({"merge": f"{setting.merge:.2f}"} if setting.merge else {}),
                        img_s=f"{record['images_per_s']:.0f}",
                    )

            # Evaluate (kNN on the labelled splits, main process)
            if train.eval_every and state.step % train.eval_every == 0:
                if main:
                    encoder = encoder_name(cfg.objective.name, cfg.eval.encoder)
                    backbone = getattr(accelerator.unwrap_model(model), encoder)
                    result = evaluate_backbone(backbone, cfg.model, cfg.data, cfg.eval, accelerator.device)
                    with open(run_dir / METRICS, "a") as f:
                        f.write(json.dumps({"step": state.step, "knn_top1": result["knn_top1"]}) + "\n")
                    bar.write(f"step {state.step}: kNN top-1 {result['knn_top1']:.4f}")
                accelerator.wait_for_everyone()

            # Checkpoint (and stop, on a signal from any process)
            stopping = any_process(accelerator, stop.requested)
            finished = _finished(train, state)
            if state.step % train.checkpoint_every == 0 or finished or stopping:
                path = _save(accelerator, run_dir, state, cfg)
            if stopping and not finished:
                bar.close()
                if main:
                    done = progress_of(train, state.step, state.budget_spent)
                    where = f"/{train.steps}" if train.budget is None else f" ({done:.1%} of the budget)"
                    print(
                        f"stopped at step {state.step}{where}; checkpoint {path}\n"
                        f"resume with: accelvit resume {run_dir}",
                        flush=True,
                    )
                return RunResult(run_dir, state.step, stopped=True)
    finally:
        stop.restore()
        bar.close()
    accelerator.wait_for_everyone()
    if main and state.bad_files:
        print(
            f"skipped {state.bad_files} reads of unreadable images, e.g. "
            + "; ".join(state.bad_file_examples),
            flush=True,
        )
    if main:
        print(
            f"done: {state.step} steps, {state.images_seen} images, {state.budget_spent:.4g} budget units\n"
            f"run: {run_dir}\nmetrics: {run_dir / METRICS}\n"
            f"export the backbone: accelvit export {run_dir} -o backbone.safetensors",
            flush=True,
        )
    return RunResult(run_dir, state.step, stopped=False)


def _log_record(
    accelerator, meter: _Meter, state: TrainState, train: TrainConfig, lr, setting, shape
) -> dict:
    """One line of metrics.jsonl; the loss is the mean over processes and over the steps since the
    last line that were not skipped (null if all were)."""
    loss = accelerator.reduce(meter.loss_sum, "mean").item() / meter.steps if meter.steps else None
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
    }


def _monitors(accelerator: Accelerator, monitors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The last step's collapse monitors, averaged over processes."""
    if not monitors:
        return {}
    values = accelerator.reduce(torch.stack(list(monitors.values())).float(), "mean").tolist()
    return {k: round(v, 6) for k, v in zip(monitors, values, strict=True)}


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step and values."""


def _grad_norm(accelerator: Accelerator, model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """Global gradient norm (clipped to `clip` if given), NaN or inf if any gradient is."""
    if clip is not None:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _stop_nonfinite(
    accelerator, run_dir: Path, state: TrainState, train: TrainConfig, cfg, loss, norm
) -> None:
    """Checkpoint the last good state (the weights before this step) unless it is saved, and stop."""
    existing = run_dir / CHECKPOINTS / f"step_{state.step}"
    path = existing if existing.is_dir() else None
    if path is None and state.step > 0:
        path = _save(accelerator, run_dir, state, cfg)
    why = (
        f"{state.skipped_in_row + 1} steps in a row (train.max_skipped)"
        if train.on_nonfinite == "skip"
        else "train.on_nonfinite: stop; 'skip' would skip such steps"
    )
    saved = f"last good state: {path}" if path else "no step was completed, nothing saved"
    raise NonFiniteError(
        f"step {state.step + 1}: non-finite loss {loss.item():.4g} or gradient norm {float(norm):.4g} "
        f"({why}); {saved}"
    )


def _save(accelerator: Accelerator, run_dir: Path, state: TrainState, cfg: Config) -> Path | None:
    """Checkpoint; on a write error stop (SaveError) or, with train.on_save_error: warn, go on."""
    try:
        return save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints, run_identity(cfg))
    except SaveError as exc:
        if cfg.train.on_save_error == "stop":
            raise
        if accelerator.is_main_process:
            warnings.warn(f"{exc}; training goes on (train.on_save_error: warn)", stacklevel=2)
        return None


def _check_bad_files(bad: list[str], policy: str, state: TrainState, main: bool) -> None:
    """data.on_bad_file: stop at the first unreadable image, or count it and name the first few."""
    for item in filter(None, bad):
        if policy == "error":
            raise ConfigError(f"unreadable image {item} (data.on_bad_file: error; 'skip' would skip it)")
        state.bad_files += 1
        if len(state.bad_file_examples) < 5 and item not in state.bad_file_examples:
            state.bad_file_examples.append(item)
            if main:
                warnings.warn(f"skipping unreadable image {item} (data.on_bad_file: skip)", stacklevel=2)


def _finished(train: TrainConfig, state: TrainState) -> bool:
    if train.budget is not None:
        return state.budget_spent >= train.budget
    return state.step >= train.steps


def _progress_bar(train: TrainConfig, state: TrainState, main: bool) -> tqdm:
    if train.budget is None:
        return tqdm(total=train.steps, initial=state.step, disable=not main, unit="step", dynamic_ncols=True)
    done = round(100 * progress_of(train, state.step, state.budget_spent), 2)
    return tqdm(
        total=100, initial=done, disable=not main, unit="%", dynamic_ncols=True, bar_format=_BUDGET_BAR
    )


_BUDGET_BAR = "{l_bar}{bar}| {n:.1f}/100% of budget [{elapsed}<{remaining}{postfix}]"


def _advance(bar: tqdm, train: TrainConfig, state: TrainState) -> None:
    if train.budget is None:
        bar.update(1)
    else:
        bar.update(round(100 * progress_of(train, state.step, state.budget_spent), 2) - bar.n)


def _decide(
    cfg, accelerator, model, images, candidates, cost, state: TrainState, stage: float, progress: float
) -> dict:
    """Measure CA-MSE of the candidates on the current model and record the best as the next stage."""
    base = cfg.model.patch_size
    k, batch = cfg.schedule.adaptive_batches, cfg.train.batch_size
    report = estimate_at(
        accelerator.unwrap_model(model), cfg, accelerator, candidates, k, state.step, progress, images
    )
    previous = setting_of(state.decisions[-1]) if state.decisions else None
    choice = choose_stage(report, cost, base, previous, cfg.schedule.monotone)
    # the estimator ran K batches of `batch` images at full input and at every candidate
    units = k * batch * sum(cost(s) for s in [Setting(1.0, base), *candidates])
    state.budget_spent += units
    state.estimator_spent += units
    decision = {
        "stage": stage,
        "step": state.step,
        "progress": progress,
        **choice.to_dict(),
        "estimator_units": units,
    }
    state.decisions.append(decision)
    return decision


def _write_decisions(run_dir: Path, decisions: list[dict]) -> None:
    write_atomic(run_dir / DECISIONS, "".join(json.dumps(d) + "\n" for d in decisions))


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
