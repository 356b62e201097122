"""The lookahead criterion: what training under each strategy does for the full-input loss, measured.

CA-MSE and descent read one gradient of the current model and predict. An adaptive run that ranks by
them measures a model trained at its own compressed setting, for which that setting's gradients look
nearly unbiased, so it keeps whatever it chose first (benchmarks/schedule_families: MoCo-v3's
descent-adaptive run chose patch 8 at the start and never went back to patch 4, the evaluated one).
Lookahead asks the question the run is judged by: from the current state, each candidate trains for
the same budget (`schedule.lookahead_steps` full-input steps' worth: a setting c times cheaper takes
1/c as many steps, on the run's next batches, at the learning rate the stage will run at), then the
objective's loss at full input is read on held-out batches, and the state is put back. The candidate
whose loss fell most per unit of that budget wins, with `accelvit.plan`'s tie rule. More, cheaper steps
and a model trained on compressed inputs count where they act: on the loss of the model evaluated.

A few steps also see what a switch does once: a new setting first costs loss (the model meets token
dropout or a new patch size), and full input first gains it quickly (the model re-fits the input it
is evaluated on, which the curriculum's last stage gives it anyway). A stage lasts hundreds of steps,
so its rate matters, not those transients: `schedule.lookahead_settle` trains that share of each
candidate's budget first and reads the decrease over the rest (schedule_families' SimCLR run without
it left patch 8 for full input at 1/4, where token dropout lost loss over 8 steps and full input
gained twice 1:8's).

Everything it does is undone: weights, buffers, optimizer state, learning rates and the RNG. It is
deterministic in (seed, step), so a resumed run takes the same decision.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from itertools import islice

import torch
from accelerate import Accelerator
from torch import nn

from accelvit.budget import CostFn
from accelvit.build import build_stream, seed_tokens
from accelvit.compress import compiled_features
from accelvit.config import Config
from accelvit.nonfinite import Guard
from accelvit.objectives import buffer_restorer
from accelvit.schedule import lr_at, weight_decay_at
from accelvit.setting import Setting, setting_of
from accelvit.step import train_step

HELD_OUT_SEED = 7_919  # held-out batches come from another permutation of the training split
FORWARD_SHARE = 1 / 3  # a forward pass of a step's forward + backward, for the overhead's count


def lookahead_steps(cost: CostFn, settings: list[Setting], full: Setting, steps: int) -> dict[Setting, int]:
    """Steps each setting trains for: the budget of `steps` full-input steps, at least one."""
    return {s: max(1, round(steps * cost(full) / cost(s))) for s in settings}


def lookahead(
    cfg: Config,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images,
    candidates: list[Setting],
    cost: CostFn,
    step: int,
    progress: float,
    batches: int,
) -> dict:
    """A report in the grad-error report's shape (`strategies` rows, `lookahead_full`) for `plan`'s
    `lookahead` metric: per candidate the held-out full-input loss decrease per unit of budget, per
    full-input step's worth (`lookahead`), its standard error over the `batches` held-out batches
    (`lookahead_se`), and the steps it took. `units`: the budget all of it spent (training steps and
    held-out forward passes), for the run to count. `model` is the run's (wrapped) model."""
    started = time.perf_counter()
    full = Setting(1.0, cfg.model.patch_size)
    settings = [full, *[s for s in candidates if s != full]]
    steps = lookahead_steps(cost, settings, full, cfg.schedule.lookahead_steps)
    global_batch = cfg.train.batch_size * accelerator.num_processes
    objective = accelerator.unwrap_model(model)
    saved_model = {k: v.clone() for k, v in objective.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    scaler = accelerator.scaler  # fp16: the loss scale moves with the steps taken
    saved_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    held_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + HELD_OUT_SEED)
    )
    stream = build_stream(held_cfg, images, accelerator, step)
    held_out = [views for views, _ in islice(stream, batches)]
    # during warm-up, the rate it ends at: a stage chosen there runs mostly at the rates after it
    lr = lr_at(cfg.optim, max(progress, cfg.optim.warmup))
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    settled = {s: min(n - 1, round(n * cfg.schedule.lookahead_settle)) for s, n in steps.items()}
    with torch.random.fork_rng(devices=devices):
        before = _held_out_losses(accelerator, objective, held_out, full, progress)
        gains = {}
        for s in settings:
            batches, first = build_stream(cfg, images, accelerator, step), settled[s]
            start = before
            if first:
                _train(cfg, accelerator, model, optimizer, batches, s, first, step, progress, lr)
                start = _held_out_losses(accelerator, objective, held_out, full, progress)
            rest = steps[s] - first
            _train(cfg, accelerator, model, optimizer, batches, s, rest, step + first, progress, lr)
            # per held-out batch, the loss decrease per full-input step's worth of the budget read over
            worth = cfg.schedule.lookahead_steps * rest / steps[s]
            gains[s] = (start - _held_out_losses(accelerator, objective, held_out, full, progress)) / worth
            objective.load_state_dict(saved_model)
            optimizer.load_state_dict(copy.deepcopy(saved_optimizer))  # load_state_dict may alias tensors
            if scaler is not None:
                scaler.load_state_dict(saved_scaler)
    training = sum(steps[s] * global_batch * cost(s) for s in settings)
    readings = 1 + len(settings) + sum(1 for n in settled.values() if n)
    forwards = readings * len(held_out) * global_batch * cost(full) * FORWARD_SHARE
    rows = [
        {**dataclasses.asdict(s), "cost": cost(s) / cost(full), "steps": steps[s], "settle_steps": settled[s],
         "lookahead": float(g.mean()), "lookahead_se": float(g.std() / math.sqrt(len(g)))}
        for s, g in gains.items()
    ]  # fmt: skip
    for row in rows:
        row.update(lookahead_full=rows[0]["lookahead"], lookahead_full_se=rows[0]["lookahead_se"])
    return {
        "step": step,
        "progress": progress,
        "lr": lr,
        "batches": len(held_out),
        "loss_before": float(before.mean()),
        "strategies": rows,
        "units": training + forwards,
        "wall_s": time.perf_counter() - started,
    }


def with_lookahead(report: dict, measured: dict) -> dict:
    """A grad-error report with the lookahead rows of `measured` joined to its strategies' rows (and
    full input's), so that `accelvit plan --metric lookahead` reads it; `lookahead` keeps the rest."""
    keys = ("lookahead", "lookahead_se", "lookahead_full", "lookahead_full_se")
    found = {setting_of(r): r for r in measured["strategies"]}
    rows = [{**row, **{k: found[setting_of(row)][k] for k in keys}} for row in report["strategies"]]
    extra = {k: measured[k] for k in ("lr", "batches", "loss_before", "units", "wall_s")}
    extra["steps"] = {setting_of(r).label: r["steps"] for r in measured["strategies"]}
    return {**report, "strategies": rows, "lookahead": extra}


def _train(cfg: Config, accelerator, model, optimizer, batches, setting: Setting, steps: int, step: int,
           progress: float, lr: float) -> None:  # fmt: skip
    """`steps` steps at `setting` on the next of the run's `batches` (the first is batch `step`), at
    `lr` and the stage's weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = weight_decay_at(cfg.optim, progress)
    guard = Guard(accelerator.device, "skip", steps + 1)  # a diverging candidate shows in its loss
    for k, (views, _) in enumerate(islice(batches, steps)):
        seed_tokens(cfg, step + k)  # token subsets of lookahead step k
        with compiled_features(cfg.train.compile):
            train_step(accelerator, model, optimizer, views, setting, progress, cfg.optim.clip_grad,
                       cfg.train.precision, guard)  # fmt: skip


@torch.no_grad()
def _held_out_losses(
    accelerator, objective: nn.Module, held_out, full: Setting, progress: float
) -> torch.Tensor:
    """The objective's full-input loss on each held-out batch, averaged over processes; the passes
    leave no trace in batch-norm statistics or DINO's centre."""
    restore = buffer_restorer(objective)
    losses = []
    for k, views in enumerate(held_out):
        torch.manual_seed(k)  # full input draws no tokens; this keeps it so for any objective
        with accelerator.autocast():
            losses.append(objective(views, full, progress).float())
    restore()
    losses = torch.stack(losses)
    if accelerator.num_processes > 1:
        losses = accelerator.reduce(losses, "mean")
    return losses.cpu().double()
