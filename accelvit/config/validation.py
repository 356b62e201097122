"""What a typed recipe must also satisfy (ranges, sizes, paths, combinations of keys), checked
before anything is written; every failure is one `ConfigError` line naming key and value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from accelvit.config.schema import (
    Config,
    ConfigError,
    CostConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RampConfig,
    ScheduleConfig,
    TrainConfig,
    _excerpt,
)
from accelvit.setting import (
    MAX_MERGE,
    allowed_patch_sizes,
    keep_ok,
    merge_ok,
    parse_strategies,
    stem_stride,
    strategy_rule,
)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {_excerpt(value)}: {why}")


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Check ranges and cross-key constraints; raise the first problem found as a ConfigError.

    One check per section; enumerations are `Literal` types, which the loader already enforces.
    """
    _check_sizes(cfg)
    _check_model(cfg.model)
    _check_data(cfg.data, check_paths)
    _check_views(cfg.data, cfg.objective.name)
    _check_objective(cfg.objective, cfg.model)
    _check_schedule(cfg.schedule, cfg.model)
    _check_optim(cfg.optim)
    _check_train(cfg.train, cfg.model)
    _check_cost(cfg.cost)
    _check_eval(cfg.eval, cfg.objective.name)


# Upper bounds on sizes: a typo such as a batch of 1e9 or 100,000 blocks must fail at once, not hang
# allocating before anything is written. Each is far beyond what a ViT pretraining run uses.
SIZE_LIMITS = {
    "model.image_size": 4096,
    "model.depth": 1024,
    "model.embed_dim": 16384,
    "model.num_heads": 1024,
    "objective.hidden_dim": 1 << 20,
    "objective.out_dim": 1 << 20,
    "objective.bottleneck_dim": 1 << 20,
    "objective.local_crops": 64,
    "data.workers": 256,
    "train.batch_size": 65536,
    "train.grad_error_batches": 4096,
    "schedule.adaptive_batches": 4096,
    "schedule.lookahead_steps": 4096,
    "eval.batch_size": 65536,
    "cost.repeats": 1000,
    "schedule.keep_buckets": 1024,
}


def _check_sizes(cfg: Config) -> None:
    for key, limit in SIZE_LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value is None or value <= limit, key, value, f"must be at most {limit}")
    for i, channels in enumerate(cfg.model.stem):
        _require(channels <= 4096, f"model.stem[{i}]", channels, "must be at most 4096")


def _check_model(m: ModelConfig) -> None:
    _require(m.image_size > 0, "model.image_size", m.image_size, "must be positive")
    _require(m.patch_size > 0, "model.patch_size", m.patch_size, "must be positive")
    _require(
        m.image_size % m.patch_size == 0,
        "model.patch_size",
        m.patch_size,
        f"must divide model.image_size ({m.image_size})",
    )
    _require(
        0 < m.precondition_alpha <= 1, "model.precondition_alpha", m.precondition_alpha, "must be in (0, 1]"
    )
    _require(
        m.value_lambdas is None or len(m.value_lambdas) == 2,
        "model.value_lambdas",
        m.value_lambdas,
        "expected [l1, l2] or null",
    )
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(m, name)
        _require(value is None or value > 0, f"model.{name}", value, "must be positive or null")
    _require(
        m.pos_embed != "sincos" or m.embed_dim is None or m.embed_dim % 4 == 0,
        "model.embed_dim",
        m.embed_dim,
        "model.pos_embed: sincos needs a multiple of 4",
    )
    _require(all(c > 0 for c in m.stem), "model.stem", m.stem, "channels must be positive")
    stride = stem_stride(m.stem)
    _require(
        m.patch_size % stride == 0,
        "model.patch_size",
        m.patch_size,
        f"must be a multiple of the stem's stride ({stride}, model.stem: {m.stem})",
    )


def _check_data(d: DataConfig, check_paths: bool) -> None:
    _require(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _require(d.limit is None or d.limit > 0, "data.limit", d.limit, "must be positive or null")
    _require(0 < d.crop_min_scale <= 1, "data.crop_min_scale", d.crop_min_scale, "must be in (0, 1]")
    if (
        check_paths
        and d.dataset != "synthetic"
        and not (d.download and d.dataset in ("fashion-mnist", "cifar10"))
    ):
        _require(
            Path(d.root).is_dir(),
            "data.root",
            d.root,
            "dataset folder does not exist"
            + (
                " (install it: apt-get install -y dataset-fashion-mnist, or set data.download: true)"
                if d.dataset == "fashion-mnist"
                else ""
            ),
        )
        _require(
            any(path.is_file() for path in Path(d.root).rglob("*")),
            "data.root",
            d.root,
            "the dataset folder holds no files",
        )


def _check_views(d: DataConfig, objective: str) -> None:
    _require(
        d.views == "objective" or objective != "dino",
        "data.views",
        d.views,
        "dino draws its own multi-crop views: leave data.views at objective",
    )


def _check_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    _require(o.temperature > 0, "objective.temperature", o.temperature, "must be positive")
    _require(o.hidden_dim > 0, "objective.hidden_dim", o.hidden_dim, "must be positive")
    _require(o.out_dim > 0, "objective.out_dim", o.out_dim, "must be positive")
    _require(0 <= o.momentum < 1, "objective.momentum", o.momentum, "must be in [0, 1)")
    _require(o.bottleneck_dim > 0, "objective.bottleneck_dim", o.bottleneck_dim, "must be positive")
    for name in ("teacher_temp", "warmup_teacher_temp"):
        _require(getattr(o, name) > 0, f"objective.{name}", getattr(o, name), "must be positive")
    _require(
        0 < o.teacher_temp_warmup <= 1,
        "objective.teacher_temp_warmup",
        o.teacher_temp_warmup,
        "must be a fraction in (0, 1]",
    )
    _require(o.local_crops >= 0, "objective.local_crops", o.local_crops, "must be >= 0")
    _require(
        0 <= o.freeze_last_layer < 1, "objective.freeze_last_layer", o.freeze_last_layer, "must be in [0, 1)"
    )
    if o.local_crop_size is not None:
        _require(
            0 < o.local_crop_size <= m.image_size and o.local_crop_size % m.patch_size == 0,
            "objective.local_crop_size",
            o.local_crop_size,
            f"must be a multiple of model.patch_size ({m.patch_size}) up to model.image_size",
        )


def _check_schedule(s: ScheduleConfig, m: ModelConfig) -> None:
    _validate_ramp(s.keep, "schedule.keep", keep_ok, "keep ratio must be in (0, 1]")
    _require(
        s.keep_buckets is None or s.keep_buckets > 0,
        "schedule.keep_buckets",
        s.keep_buckets,
        "must be positive",
    )
    allowed = patch_sizes(m)
    rule = "divisors of model.image_size >= model.patch_size" + (
        f", multiples of the stem's stride {stem_stride(m.stem)}" if m.stem else ""
    )
    _validate_ramp(
        s.patch,
        "schedule.patch",
        lambda v: v is None or v in allowed,
        f"patch size must be one of {allowed} ({rule})",
    )
    _validate_ramp(s.merge, "schedule.merge", merge_ok, f"merge fraction must be in [0, {MAX_MERGE:g}]")
    last = -1.0
    for i, point in enumerate(s.stages):
        _require(0 <= point < 1 and point > last, f"schedule.stages[{i}]", point, "must increase in [0, 1)")
        last = point
    _require(
        s.mode == "fixed" or bool(s.stages), "schedule.stages", s.stages, "adaptive mode needs stage points"
    )
    _validate_strategies(s.candidates, "schedule.candidates", allowed)
    _require(s.adaptive_batches >= 2, "schedule.adaptive_batches", s.adaptive_batches, "must be >= 2")
    _require(s.lookahead_steps >= 1, "schedule.lookahead_steps", s.lookahead_steps, "must be >= 1")
    settle = s.lookahead_settle
    _require(0 <= settle < 1, "schedule.lookahead_settle", settle, "must be in [0, 1)")


def _check_optim(op: OptimConfig) -> None:
    _require(op.lr > 0, "optim.lr", op.lr, "must be positive")
    _require(op.poly_power > 0, "optim.poly_power", op.poly_power, "must be positive")
    _require(0 <= op.min_lr <= op.lr, "optim.min_lr", op.min_lr, "must be in [0, optim.lr]")
    _require(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "must be >= 0")
    _require(
        op.weight_decay_end is None or op.weight_decay_end >= 0,
        "optim.weight_decay_end",
        op.weight_decay_end,
        "must be >= 0 or null",
    )
    _require(0 <= op.warmup < 1, "optim.warmup", op.warmup, "must be a fraction in [0, 1)")
    _require(op.clip_grad is None or op.clip_grad > 0, "optim.clip_grad", op.clip_grad, "must be > 0")


def _check_train(t: TrainConfig, model: ModelConfig) -> None:
    _require(0 <= t.seed < 2**32, "train.seed", t.seed, "must be in [0, 2^32)")
    _require(t.process_timeout > 0, "train.process_timeout", t.process_timeout, "must be positive")
    for name in t.log_with:
        _require(
            importlib.util.find_spec(name) is not None,
            "train.log_with",
            t.log_with,
            f"{name} is not installed (pip install {name}; TensorBoard: pip install 'accelvit[tensorboard]')",
        )
    _require(
        (t.steps is None) != (t.budget is None),
        "train.steps",
        t.steps,
        f"give exactly one of train.steps and train.budget (budget: {t.budget!r}); set the other to null",
    )
    _require(t.steps is None or t.steps > 0, "train.steps", t.steps, "must be a positive number of steps")
    _require(t.budget is None or t.budget > 0, "train.budget", t.budget, "must be positive")
    _require(t.batch_size > 1, "train.batch_size", t.batch_size, "must be at least 2")
    _require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
    _require(t.eval_every is None or t.eval_every > 0, "train.eval_every", t.eval_every, "must be > 0")
    _require(
        t.diagnostics_every is None or t.diagnostics_every > 0,
        "train.diagnostics_every",
        t.diagnostics_every,
        "must be > 0",
    )
    for i, point in enumerate(t.grad_error_at):
        _require(0 <= point < 1, f"train.grad_error_at[{i}]", point, "must be a progress in [0, 1)")
    _require(t.grad_error_batches >= 2, "train.grad_error_batches", t.grad_error_batches, "must be >= 2")
    _validate_strategies(t.grad_error_strategies, "train.grad_error_strategies", patch_sizes(model))
    _require(t.checkpoint_every > 0, "train.checkpoint_every", t.checkpoint_every, "must be > 0")
    _require(t.keep_checkpoints > 0, "train.keep_checkpoints", t.keep_checkpoints, "must be > 0")
    _require(t.max_skipped > 0, "train.max_skipped", t.max_skipped, "must be positive")


def _check_cost(c: CostConfig) -> None:
    _require(c.repeats > 0, "cost.repeats", c.repeats, "must be positive")


def _check_eval(e: EvalConfig, objective: str) -> None:
    _require(e.k > 0, "eval.k", e.k, "must be positive")
    _require(e.temperature > 0, "eval.temperature", e.temperature, "must be positive")
    for name in ("train_limit", "test_limit"):
        value = getattr(e, name)
        _require(value is None or value > 0, f"eval.{name}", value, "must be positive or null")
    _require(e.batch_size > 0, "eval.batch_size", e.batch_size, "must be positive")
    _require(e.linear_epochs > 0, "eval.linear_epochs", e.linear_epochs, "must be positive")
    _require(
        e.encoder != "teacher" or objective != "simclr",
        "eval.encoder",
        e.encoder,
        f"objective {objective} has no teacher (momentum) encoder",
    )


def _validate_strategies(text: str | None, key: str, allowed: list[int]) -> None:
    if text is None:
        return

    for item in text.split(","):
        try:
            (setting,) = parse_strategies(item)
            ok = setting.fits(allowed)
        except ValueError:
            ok = False
        _require(ok, key, item, f"expected keep:patch[:merge], {strategy_rule(allowed)}")


def _validate_ramp(ramp: RampConfig, key: str, ok: Any, why: str) -> None:
    if ramp.shape != "random":
        _require(ramp.choices is None, f"{key}.choices", ramp.choices, "only for shape random")
        _require(ramp.weights is None, f"{key}.weights", ramp.weights, "only for shape random")
    if ramp.shape == "random":
        _require(bool(ramp.choices), f"{key}.choices", ramp.choices, "a random schedule needs [v1, v2, ...]")
        for i, value in enumerate(ramp.choices or []):
            _require(ok(value), f"{key}.choices[{i}]", value, why)
        if ramp.weights is not None:
            _require(
                len(ramp.weights) == len(ramp.choices or [])
                and all(w >= 0 for w in ramp.weights)
                and sum(ramp.weights) > 0,
                f"{key}.weights",
                ramp.weights,
                "one non-negative weight per choice, not all 0",
            )
        for name in ("start", "end", "points"):
            value = getattr(ramp, name)
            _require(value is None, f"{key}.{name}", value, "not for shape random")
        return
    if ramp.shape == "step":
        _require(bool(ramp.points), f"{key}.points", ramp.points, "a step schedule needs [[p, v], ...]")
        last = -1.0
        for i, point in enumerate(ramp.points or []):
            _require(len(point) == 2, f"{key}.points[{i}]", point, "expected [progress, value]")
            progress, value = point
            _require(
                0 <= progress <= 1 and progress > last,
                f"{key}.points[{i}]",
                point,
                "progress must be in [0, 1] and increasing",
            )
            _require(ok(value), f"{key}.points[{i}]", point, why)
            last = progress
        return
    _require(ramp.points is None, f"{key}.points", ramp.points, "only for shape step")
    _require(ok(ramp.start), f"{key}.start", ramp.start, why)
    if ramp.end is not None:
        _require(ok(ramp.end), f"{key}.end", ramp.end, why)


def patch_sizes(model: ModelConfig) -> list[int]:
    """The patch sizes a curriculum may use for full-size views of this model."""
    return allowed_patch_sizes(model.image_size, model.patch_size, stem_stride(model.stem))
