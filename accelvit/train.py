"""The pretraining loop: one function, read top to bottom.

Per step: read the compression setting and learning rate from progress -> forward/backward the
objective -> optimizer step -> momentum update -> log -> checkpoint. Everything that varies over
training is a pure function of the step, so a checkpoint needs only the step besides the model,
optimizer and RNG states.
"""

from __future__ import annotations

import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from accelvit.budget import finished, progress_of
from accelvit.build import Run, build_run, estimate_at
from accelvit.checkpoint import (
    CHECKPOINTS,
    DIAGNOSTICS,
    GRAD_ERROR,
    METRICS,
    TrainState,
    latest_checkpoint,
    save,
    write_decisions,
)
from accelvit.compress import compiled_features
from accelvit.config import Config, ConfigError, TrainConfig
from accelvit.diagnostics import measure_blocks
from accelvit.distributed import (
    PeerTimeout,
    any_process,
    is_timeout,
    report_position,
    stalled_message,
)
from accelvit.evaluate import evaluate_backbone
from accelvit.lookahead import lookahead, with_lookahead
from accelvit.metrics import Meter, advance, append_jsonl, log_record, progress_bar, show
from accelvit.monitor import collapse_warning
from accelvit.nonfinite import Guard
from accelvit.objectives import encoder_name
from accelvit.plan import PER_COST, choose_stage
from accelvit.report import write_grad_report
from accelvit.schedule import current_setting, due, due_points, lr_at, weight_decay_at
from accelvit.setting import Setting, setting_of, stem_stride
from accelvit.step import train_step
from accelvit.trackers import finish_trackers, log_grad_report, log_scalars


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped: bool  # True when a signal ended the run before its end


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
    """Pretrain the backbone of `cfg` in `run_dir` (created beforehand by `create_run_dir`).

    SIGTERM and Ctrl-C are caught from the start: one that comes while the model, data and costs are
    being set up stops the run at its first step's checkpoint.
    """
    stop = StopRequest()
    try:
        return _pretrain(cfg, run_dir, resume, stop)
    except RuntimeError as exc:
        if is_timeout(exc) and dist.is_initialized():
            raise PeerTimeout(stalled_message(cfg.train.process_timeout)) from exc
        raise
    finally:
        stop.restore()


def _pretrain(cfg: Config, run_dir: Path, resume: bool, stop: StopRequest) -> RunResult:
    run = build_run(cfg, run_dir, resume)  # model, optimizer, data, step costs, trackers, state
    accelerator, state, train, objective = run.accelerator, run.state, cfg.train, run.objective
    main, shape = accelerator.is_main_process, run.shape
    bar, meter = progress_bar(train, state, main), Meter(state.partial_log)
    guard = Guard(accelerator.device, train.on_nonfinite, train.max_skipped, state.skipped_in_row)
    warned = False  # a collapse warning is printed once a run
    try:
        while not finished(train, state.step, state.budget_spent):
            progress = progress_of(train, state.step, state.budget_spent)
            report_position(state.step, f"step {state.step + 1}")

            # Data (time spent waiting for it is data_s)
            tick = time.perf_counter()
            views, bad = next(run.stream)
            meter.data_s += time.perf_counter() - tick
            _check_bad_files(bad, cfg.data.on_bad_file, state, main)

            # Measurements on the current model: attention, gradient error, the adaptive stages
            _measure(cfg, run, run_dir, progress, bar)

            # Compression setting, learning rate and weight decay at this point of training
            setting = current_setting(
                cfg.schedule, progress, cfg.model.image_size, cfg.model.patch_size, state.decisions,
                stem_stride(cfg.model.stem), state.step, train.seed,
            )  # fmt: skip
            step_units = run.cost(setting) * run.global_batch
            lr = _set_rates(run.optimizer, cfg, state, progress, step_units)

            # Forward, backward, step, momentum; a non-finite loss or gradient skips the step or stops
            before = (state.step, state.images_seen, state.budget_spent)
            with compiled_features(train.compile):
                loss, grad_norm, ok, stop_flag = train_step(
                    accelerator, run.model, run.optimizer, views, setting, progress, cfg.optim.clip_grad,
                    train.precision, guard, stop.requested,
                )  # fmt: skip
            _count_step(state, run.global_batch, step_units)
            meter.add(loss.detach(), run.global_batch, ok)
            guard.record(loss, grad_norm, before, stop_flag)
            done = finished(train, state.step, state.budget_spent)
            # a signal: several processes learn of one from the flags, so all stop at the same step
            stopping = guard.stop_requested if accelerator.num_processes > 1 else stop.requested
            # the host reads a step's flags while the device runs the next one; all of them before
            # anything that logs, evaluates or saves
            periodic = (train.log_every, train.eval_every, train.checkpoint_every)
            boundary = done or stopping or any(due(state.step, n) for n in periodic)
            halted = guard.settle(state, keep=0 if boundary else 1)
            if halted:  # stopping checkpoints the state before that step
                state.partial_log = meter.partial(accelerator)
                _stop_nonfinite(
                    accelerator, objective, run_dir, state, train, run.identity, halted.loss, halted.grad_norm
                )
            advance(bar, train, state)

            # Log (and warn once if the collapse monitors read collapsed)
            if due(state.step, train.log_every) or finished(train, state.step, state.budget_spent):
                record = log_record(accelerator, meter, state, train, lr, setting, shape, objective.monitors)
                meter = Meter()
                warning = collapse_warning(record, shape.embed_dim) if record["progress"] >= 0.1 else None
                if main:
                    append_jsonl(run_dir / METRICS, record)
                    state.last_log = record
                    log_scalars(accelerator, record)
                    show(bar, record, setting)
                    if warning and not warned:
                        bar.write(f"warning: {warning}")
                warned = warned or warning is not None

            # Evaluate (kNN on the labelled splits, main process)
            if due(state.step, train.eval_every):
                _evaluate(cfg, run, run_dir, bar)

            # Checkpoint (and stop, on a signal)
            if due(state.step, train.checkpoint_every) or done or stopping:
                state.partial_log = meter.partial(accelerator)
                path = save(
                    accelerator, run_dir, state, train.keep_checkpoints, train.on_save_error, run.identity
                )
            if stopping and not done:
                bar.close()
                if main:
                    print(_stopped_message(train, state, run_dir, path), flush=True)
                return RunResult(run_dir, state.step, stopped=True)
    finally:
        bar.close()
        finish_trackers(accelerator)
    accelerator.wait_for_everyone()
    if main:
        print(_done_message(state, run_dir), flush=True)
    return RunResult(run_dir, state.step, stopped=False)


def _set_rates(optimizer, cfg: Config, state: TrainState, progress: float, step_units: float) -> float:
    """The learning rate and weight decay of this step, set on the optimizer; returns the rate."""
    # the learning rate of the progress reached by this step: the first step must not get lr 0
    lr = lr_at(cfg.optim, progress_of(cfg.train, state.step + 1, state.budget_spent + step_units))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = weight_decay_at(cfg.optim, progress)
    return lr


def _evaluate(cfg: Config, run: Run, run_dir: Path, bar) -> None:
    """The in-loop kNN (`train.eval_every`) of the objective's evaluation encoder, on the main process."""
    accelerator, state = run.accelerator, run.state
    if accelerator.is_main_process:
        encoder = getattr(run.objective, encoder_name(cfg.objective.name, cfg.eval.encoder))
        result = evaluate_backbone(encoder, cfg.model, cfg.data, cfg.eval, accelerator.device)
        record = {"step": state.step, "knn_top1": result["knn_top1"]}
        append_jsonl(run_dir / METRICS, record)
        state.last_log = record
        log_scalars(accelerator, record)
        bar.write(f"step {state.step}: kNN top-1 {result['knn_top1']:.4f}")
    accelerator.wait_for_everyone()


def _measure(cfg: Config, run: Run, run_dir: Path, progress: float, bar) -> None:
    """What is due at this point of training: attention diagnostics on the probe batch
    (`train.diagnostics_every`), grad-error reports (`train.grad_error_at`) and the adaptive
    schedule's stages (`schedule.stages`), each measured on the current model."""
    train, state, main = cfg.train, run.state, run.accelerator.is_main_process
    accelerator, objective, optimizer = run.accelerator, run.objective, run.optimizer
    # Attention diagnostics on the fixed probe batch (train.diagnostics_every)
    if main and due(state.step, train.diagnostics_every):
        blocks = measure_blocks(objective.backbone, run.probe)
        record = {"step": state.step, "progress": progress, "blocks": blocks}
        append_jsonl(run_dir / DIAGNOSTICS, record)

    # Gradient error of compressed inputs on the current model (train.grad_error_at)
    for point in due_points(train.grad_error_at, progress, state.grad_error_done):
        report = estimate_at(
            objective, cfg, accelerator, run.grad_error_strategies, train.grad_error_batches, state.step,
            progress, run.images, optimizer,
        )  # fmt: skip
        if train.grad_error_lookahead:
            measured = lookahead(
                cfg, accelerator, run.model, optimizer, run.images, run.grad_error_strategies, run.cost,
                state.step, progress, train.grad_error_batches,
            )  # fmt: skip
            report = with_lookahead(report, measured)
        state.grad_error_done.append(point)
        if main:
            write_grad_report(report, run_dir / GRAD_ERROR / f"step_{state.step}.json")
            log_grad_report(accelerator, report)

    # Adaptive schedule: at each stage, measure the candidates and switch to the best one
    if cfg.schedule.mode == "adaptive":
        done = [d["stage"] for d in state.decisions]
        for stage in due_points(cfg.schedule.stages, progress, done):
            decision = _decide(
                cfg, accelerator, run.model, optimizer, run.images, run.candidates, run.cost, state, stage,
                progress,
            )  # fmt: skip
            if main:
                write_decisions(run_dir, state.decisions)
                bar.write(_decision_message(decision))


def _count_step(state: TrainState, images: int, units: float) -> None:
    """What a step counts whether or not it was skipped (`Guard.settle` counts the skips)."""
    state.step += 1
    state.images_seen += images
    state.budget_spent += units


def _decision_value(decision: dict) -> str:
    for metric in PER_COST:
        if f"{metric}_per_cost" in decision:
            return f"{metric} per unit cost {decision[f'{metric}_per_cost']:.3e}"
    return f"CA-MSE {decision['ca_mse']:.3e}"


def _decision_message(decision: dict) -> str:
    return (
        f"stage {decision['stage']:g} (step {decision['step']}): {setting_of(decision).label} "
        f"(keep:patch[:merge], {_decision_value(decision)})"
    )


def _stopped_message(train: TrainConfig, state: TrainState, run_dir: Path, path: Path | None) -> str:
    done = progress_of(train, state.step, state.budget_spent)
    where = f"/{train.steps}" if train.budget is None else f" ({done:.1%} of the budget)"
    return f"stopped at step {state.step}{where}; checkpoint {path}\nresume with: accelvit resume {run_dir}"


def _done_message(state: TrainState, run_dir: Path) -> str:
    examples = "; ".join(state.bad_file_examples)
    skipped = f"skipped {state.bad_files} reads of unreadable images, e.g. {examples}\n"
    return (
        (skipped if state.bad_files else "") + f"done: {state.step} steps, {state.images_seen} images, "
        f"{state.budget_spent:.4g} budget units\n"
        f"run: {run_dir}\nmetrics: {run_dir / METRICS}\n"
        f"export the backbone: accelvit export {run_dir} -o backbone.safetensors"
    )


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step and values."""


def _stop_nonfinite(
    accelerator, objective, run_dir: Path, state: TrainState, train: TrainConfig, identity: dict, loss, norm
) -> None:
    """Checkpoint the last good state (the weights before this step) unless it is saved, and stop.

    Weights that are no longer finite themselves are no good state: the newest checkpoint is then it.
    """
    existing = run_dir / CHECKPOINTS / f"step_{state.step}"
    path = existing if existing.is_dir() else None
    broken = any_process(accelerator, not all(bool(torch.isfinite(p).all()) for p in objective.parameters()))
    if path is None and state.step > 0 and not broken:
        path = save(accelerator, run_dir, state, train.keep_checkpoints, train.on_save_error, identity)
    elif broken:
        path = latest_checkpoint(run_dir)
    why = (
        f"{state.skipped_in_row + 1} steps in a row (train.max_skipped)"
        if train.on_nonfinite == "skip"
        else "train.on_nonfinite: stop; 'skip' would skip such steps"
    )
    saved = f"last good state: {path}" if path else "no good state was saved"
    if broken:
        saved = f"the weights are no longer finite; {saved}"
    raise NonFiniteError(
        f"step {state.step + 1}: non-finite loss {loss.item():.4g} or gradient norm {float(norm):.4g} "
        f"({why}); {saved}"
    )


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


def _decide(
    cfg, accelerator, model, optimizer, images, candidates, cost, state: TrainState, stage: float,
    progress: float,
) -> dict:  # fmt: skip
    """Measure the candidates on the current model (`schedule.adaptive_metric`) and record the best
    as the next stage."""
    objective = accelerator.unwrap_model(model)
    base = cfg.model.patch_size
    k, batch = cfg.schedule.adaptive_batches, cfg.train.batch_size
    metric = cfg.schedule.adaptive_metric
    previous = setting_of(state.decisions[-1]) if state.decisions else None
    if metric == "lookahead":
        # a candidate the monotone rule excludes is not worth its training steps
        floor = cost(previous) if previous is not None and cfg.schedule.monotone else 0.0
        allowed = [s for s in candidates if cost(s) >= floor - 1e-12]
        report = lookahead(cfg, accelerator, model, optimizer, images, allowed, cost, state.step, progress, k)
        units = report["units"]
    else:
        descent = metric == "descent"
        report = estimate_at(
            objective, cfg, accelerator, candidates, k, state.step, progress, images, optimizer, descent
        )
        # the estimator ran K batches of `batch` images at full input and at every candidate, and for
        # the descent criterion each process two more at full input (its curvature probes)
        units = k * batch * sum(cost(s) for s in [Setting(1.0, base), *candidates])
        if descent:
            units += 2 * accelerator.num_processes * batch * cost(Setting(1.0, base))
    choice = choose_stage(report, cost, base, previous, cfg.schedule.monotone, metric)
    state.budget_spent += units
    state.estimator_spent += units
    decision = {
        "stage": stage,
        "step": state.step,
        "progress": progress,
        **choice.to_dict(),
        "estimator_units": units,
    }
    if metric == "lookahead":  # what each candidate did, for reading the choice later
        keys = ("lookahead", "lookahead_se", "steps", "settle_steps")
        decision["measured"] = {setting_of(r).label: {k: r[k] for k in keys} for r in report["strategies"]}
    state.decisions.append(decision)
    return decision
