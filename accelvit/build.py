"""The composition root: the one module below the loop and the CLI that reads the whole recipe.

It builds the objective model, the run's data stream (views drawn per step), the strategies the
estimator and the adaptive schedule compare, the cost model a step is counted with, and puts a model
state, the data stream and `accelvit.gradbias`'s math together into a grad-error report. The modules
below it receive their own sections.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from accelvit.augment import batch_views
from accelvit.backbone import build_backbone, vit_shape
from accelvit.budget import CostFn, VitShape, flops_cost_fn, progress_of, relative_cost, table_cost_fn
from accelvit.checkpoint import STATE, TrainState, resume_state, run_identity
from accelvit.config import Config, OptimConfig, patch_sizes
from accelvit.data import StepBatchSampler, build_loader, encoded_images, load_dataset
from accelvit.diagnostics import measure_blocks, probe_batch
from accelvit.distributed import report_position, use_cpu
from accelvit.gradbias import SCHEMA, measure, summarize
from accelvit.objectives import OBJECTIVES, view_pipeline
from accelvit.schedule import lr_at
from accelvit.setting import Setting, strategies_or_default, strategy_rule
from accelvit.timing import measure_costs, measured_settings, shared_cost_table
from accelvit.trackers import start_trackers


def build_model(cfg: Config, sync_batch_norm: bool = False) -> nn.Module:
    """The objective module around a freshly initialised backbone (seed first: every process must
    build the same weights). `sync_batch_norm`: head batch norm over the global batch (multi-GPU)."""
    backbone = build_backbone(cfg.model)
    model = OBJECTIVES[cfg.objective.name].build(cfg.objective, backbone, cfg.schedule.dropout_views)
    if sync_batch_norm:
        # torch syncs batch norm on GPUs only: on CPU each process normalises its own batch (DDP
        # broadcasts rank 0's running statistics at every forward)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_stream(
    cfg: Config, images, accelerator: Accelerator, start: int
) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
    """Each step's views on the device and the unreadable files met loading them, from step `start`.

    A pure function of (seed, step, process), so a resumed run sees the batches and views it would
    have seen.
    """
    train, rank = cfg.train, accelerator.process_index
    sampler = StepBatchSampler(
        len(images), train.batch_size, train.seed, start, train.steps, rank, accelerator.num_processes
    )
    transform, specs = view_pipeline(cfg)  # specs: views drawn on the device (data.augment: device)
    if specs is not None:
        images = encoded_images(images)
    loader = build_loader(images, transform, cfg.data.workers, sampler, accelerator.device.type == "cuda")
    for step, (loaded, _, bad) in enumerate(loader, start):
        yield batch_views(loaded, specs, train.seed, step, rank, accelerator.device), bad


def seed_tokens(cfg: Config, step: int) -> None:
    """Seed the token subsets of a measuring pass over batch `step` (the estimator's, the lookahead's),
    so that they are the same whenever it is measured, resumed or not."""
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)


def strategies(cfg: Config) -> tuple[list[Setting], list[Setting]]:
    """The estimator's strategies (`train.grad_error_strategies`) and the adaptive schedule's
    candidates (`schedule.candidates`, full input left out: it is always a candidate)."""
    base, allowed = cfg.model.patch_size, patch_sizes(cfg.model)
    candidates = strategies_or_default(cfg.schedule.candidates, base, allowed)
    return (
        strategies_or_default(cfg.train.grad_error_strategies, base, allowed),
        [s for s in candidates if s != Setting(1.0, base)],
    )


def build_cost(
    cfg: Config, accelerator: Accelerator, model: nn.Module, images, run_dir, candidates: list[Setting]
) -> CostFn:
    """Budget units per image of a step at a setting: analytic FLOPs, or timed once per run and shared."""
    if cfg.cost.model == "measured":
        measure = measured_settings(cfg, candidates if cfg.schedule.mode == "adaptive" else ())
        pipeline = view_pipeline(cfg)
        return table_cost_fn(shared_cost_table(accelerator, model, images, pipeline, measure, cfg, run_dir))
    return flops_cost(cfg, vit_shape(accelerator.unwrap_model(model).backbone, cfg.model.image_size))


def recipe_shape(cfg: Config) -> VitShape:
    """The cost model's shape of the recipe's backbone, built on the meta device (no weights)."""
    with torch.device("meta"):
        return vit_shape(build_backbone(cfg.model), cfg.model.image_size)


def flops_cost(cfg: Config, shape: VitShape | None = None) -> CostFn:
    """Budget units per image of a step of the recipe's objective at a setting, from analytic FLOPs."""
    branches = OBJECTIVES[cfg.objective.name].branches(cfg.objective, cfg.model, cfg.schedule.dropout_views)
    return flops_cost_fn(shape or recipe_shape(cfg), branches, cfg.model.patch_size)


def measured_cost_fn(cfg: Config) -> CostFn:
    """Step costs timed on this machine with random images (timing does not depend on content)."""
    model = build_model(cfg)
    transform = OBJECTIVES[cfg.objective.name].transform(cfg.objective, cfg.model, cfg.data)
    size = cfg.model.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    views = [
        torch.stack(v) for v in zip(*(transform(image) for _ in range(cfg.train.batch_size)), strict=True)
    ]
    return table_cost_fn(measure_costs(model, views, measured_settings(cfg), cfg.cost.repeats))


def estimate(
    cfg: Config,
    strategies: list[Setting],
    num_batches: int,
    checkpoint=None,
    step: int = 0,
) -> dict:
    """Run the estimator for `cfg` (weights from `checkpoint`, else a fresh init); returns a report."""
    accelerator = Accelerator(mixed_precision=cfg.train.precision, cpu=use_cpu())
    set_seed(cfg.train.seed)
    model = build_model(cfg)
    progress = 0.0
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        state = json.loads((checkpoint / STATE).read_text())
        progress = progress_of(cfg.train, state["step"], state.get("budget_spent", 0.0))
    model = model.to(accelerator.device)
    return estimate_at(model, cfg, accelerator, strategies, num_batches, step, progress)


# what a report holds for the descent criterion; curvature_s: what it adds to the estimator's time
DESCENT_KEYS = ("lr", "curvature", "curvature_noise", "momentum", "curvature_s", "preconditioner_from")


def estimate_at(
    model: nn.Module,
    cfg: Config,
    accelerator,
    strategies: list[Setting],
    num_batches: int,
    step: int,
    progress: float,
    images=None,
    optimizer: torch.optim.Optimizer | None = None,
    descent: bool = True,
) -> dict:
    """The grad-error report of `model` (the objective module, unwrapped) at `step` of `cfg`'s run.

    Batch k is batch `step + k` of the run's data stream (the same views whatever the number of
    processes); process r measures the batches with k % processes == r, token subsets seeded per
    batch, and the sums are added over processes. The global RNG state is left as it was.
    `images`: the run's training split, if already loaded (else it is loaded here). `optimizer`:
    the run's, whose second moments precondition the descent criterion (without it, the batches').
    `descent`: measure what the descent criterion needs (two curvature probes a process); an
    adaptive stage that ranks by CA-MSE leaves it out.
    """
    started = time.perf_counter()
    allowed = patch_sizes(cfg.model)
    for s in strategies:
        if not s.fits(allowed):
            raise ValueError(f"strategy {s.label}: {strategy_rule(allowed)}")
    shape = vit_shape(model.backbone, cfg.model.image_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    images = images if images is not None else load_dataset(cfg.data)  # the run passes its own
    stream = StepBatchSampler(len(images), cfg.train.batch_size, cfg.train.seed, step, step + num_batches)
    mine = [(k, keys) for k, keys in enumerate(stream) if k % world == rank]
    transform, specs = view_pipeline(cfg)
    loader = build_loader(
        encoded_images(images) if specs is not None else images,
        transform,
        cfg.data.workers,
        [keys for _, keys in mine],
        accelerator.device.type == "cuda",
    )

    def batches() -> Iterator[list[torch.Tensor]]:
        for (k, _), (views, _, _) in zip(mine, loader, strict=True):
            seed_tokens(cfg, step + k)  # token subsets of batch k
            # batch k's views as the run's first process draws them (data.augment: device)
            yield batch_views(views, specs, cfg.train.seed, step + k, 0, accelerator.device)

    shown = tqdm(
        batches(), f"gradient error at step {step}", len(mine), leave=False, unit="batch",
        disable=not accelerator.is_main_process,
    )  # fmt: skip  # minutes of work inside a run or alone: progress, gone when done
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        raw = measure(
            model,
            shown,
            strategies,
            cfg.model.patch_size,
            progress,
            gather=accelerator.gather,
            autocast=accelerator.autocast,
            # during warm-up, the rate it ends at: a stage chosen there runs mostly at the rates after
            # it, and the instantaneous one (0 at the start) would leave only the first-order term
            lr=lr_at(cfg.optim, max(progress, cfg.optim.warmup)) if descent else None,
            optimizer=optimizer,
        )
    flops = {s: relative_cost(shape, s, cfg.model.patch_size) for s in strategies}
    probe = probe_batch(images, cfg.model.image_size).to(accelerator.device)
    return {
        "schema": SCHEMA,
        "model": dataclasses.asdict(cfg.model),
        "objective": cfg.objective.name,
        "dataset": cfg.data.dataset,
        "step": step,
        "progress": progress,
        "batches": len(raw["full"]),
        "batch_size": cfg.train.batch_size,
        "processes": world,
        "device": accelerator.device.type,
        "groups": [g.name for g in raw["groups"]],
        "strategies": summarize(raw, flops),
        **{k: raw[k] for k in DESCENT_KEYS if k in raw},
        "wall_s": time.perf_counter() - started,
        "diagnostics": measure_blocks(model.backbone, probe),  # attention of the measured state
    }


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
    # fused: one kernel for all parameters, and it can skip a step on the device (`found_inf`)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


@dataclasses.dataclass
class Run:
    """What a training run is made of, built before its first step; the loop only steps it."""

    accelerator: Accelerator
    model: nn.Module  # as prepared (wrapped for data parallelism on several processes)
    objective: nn.Module  # the same module, unwrapped
    optimizer: torch.optim.Optimizer
    shape: VitShape
    state: TrainState  # a resumed run's, or a new one
    identity: dict  # what a checkpoint must match to resume this run
    images: object  # the training split
    stream: Iterator[tuple[list[torch.Tensor], list[str]]]  # each step's views on the device
    probe: torch.Tensor | None  # the attention diagnostics' fixed batch
    grad_error_strategies: list[Setting]
    candidates: list[Setting]  # the adaptive schedule's
    cost: CostFn  # budget units per image of a step at a setting
    global_batch: int


def build_run(cfg: Config, run_dir: Path, resume: bool) -> Run:
    """Everything `cfg`'s run in `run_dir` needs, on every process: the accelerator, the model and
    optimizer (from the newest checkpoint when `resume`), the trackers, the data stream from the
    run's step, and the cost model."""
    # a hung peer stops the others after train.process_timeout, not torch's silent 30 minutes
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.process_timeout))
    accelerator = Accelerator(
        mixed_precision=cfg.train.precision,
        cpu=use_cpu(),
        kwargs_handlers=[timeout],
        log_with=cfg.train.log_with or None,
        project_dir=str(run_dir),
    )
    train = cfg.train
    global_batch = train.batch_size * accelerator.num_processes
    identity = run_identity(cfg)

    # Model, identical on every process (same seed); DDP keeps it so.
    report_position(-3, "building the model")
    set_seed(train.seed)
    sync = accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    model = build_model(cfg, sync_batch_norm=sync)  # batch norm over the global batch, as the references
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = accelerator.unwrap_model(model)
    shape = vit_shape(objective.backbone, cfg.model.image_size)

    # Resume: model, optimizer, RNG states and the TrainState come back from the checkpoint.
    state = resume_state(accelerator, run_dir, model, identity) if resume else None
    if state is None:
        state = TrainState()
        set_seed(train.seed + accelerator.process_index)  # token dropout differs per process
    start_trackers(accelerator, cfg, run_dir, state.step)

    # Data, and the cost of a step in budget units per image (the budget's currency)
    report_position(-2, "loading the data")
    images = load_dataset(cfg.data, train=True)
    if train.eval_every:  # the split the in-loop kNN tests on: missing, it must fail now, not at step N
        load_dataset(cfg.data, train=False)
    stream = build_stream(cfg, images, accelerator, state.step)
    probe = None
    if train.diagnostics_every:  # the fixed batch the attention diagnostics are measured on
        probe = probe_batch(images, cfg.model.image_size).to(accelerator.device)
    grad_error_strategies, candidates = strategies(cfg)
    report_position(-1, "measuring step costs")
    cost = build_cost(cfg, accelerator, model, images, run_dir, candidates)

    return Run(
        accelerator, model, objective, optimizer, shape, state, identity, images, stream, probe,
        grad_error_strategies, candidates, cost, global_batch,
    )  # fmt: skip
