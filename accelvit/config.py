"""Recipes: a typed dataclass tree, loaded from YAML with `--set` overrides and validated.

This module is the one place where every recipe key, its default and its meaning are written down
(`accelvit defaults` prints them as a commented YAML recipe). Validation happens here, before any
file is written, and every problem is reported as one `ConfigError` line naming the key and value.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from accelvit.setting import (
    MAX_MERGE,
    allowed_patch_sizes,
    keep_ok,
    merge_ok,
    parse_strategies,
    stem_stride,
    strategy_rule,
)

Dataset = Literal["fashion-mnist", "cifar10", "imagefolder", "shards", "synthetic"]
Shape = Literal["constant", "linear", "cosine", "step", "random"]
DATASETS, SHAPES = typing.get_args(Dataset), typing.get_args(Shape)
# accelerate's trackers, each named as the package it needs
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]
ObjectiveName = Literal["dino", "mocov3", "simclr"]  # the keys of accelvit.objectives.OBJECTIVES (tested)


class ConfigError(ValueError):
    """A recipe problem, phrased as one line that names the key and the value at fault."""


def _doc(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _copy(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


COMPILE_KEEP_BUCKETS = 16  # token counts a compiled run sees: keep in steps of 1/16


@dataclass
class ModelConfig:
    arch: str = _doc("vit_tiny_patch16_224", "timm ViT name; built with random init, no download")
    image_size: int = _doc(32, "side of the (square) input images in pixels")
    patch_size: int = _doc(4, "base patch size; must divide image_size")
    embed_dim: int | None = _doc(None, "override the arch's embedding width (null: arch default)")
    depth: int | None = _doc(None, "override the arch's number of blocks (null: arch default)")
    num_heads: int | None = _doc(None, "override the arch's attention heads (null: arch default)")
    value_residual: bool = _doc(False, "mix each block's attention values with the first block's (ResFormer)")
    value_lambdas: list[float] | None = _doc(
        None, "value residual: fixed [l1, l2] of V' = l1 V_n + l2 V_1 (null: learnable, from 0.5, 0.5)"
    )
    attn_skip: bool = _doc(True, "false removes the skip connection around self-attention (ablation)")
    token_precondition: Literal["none", "svd"] = _doc(
        "none", "none, or svd: spectral preconditioning of the patch tokens"
    )
    precondition_alpha: float = _doc(1.0, "svd preconditioning: singular values s -> s^a s_max^(1-a)")
    pos_embed: Literal["learn", "sincos"] = _doc(
        "learn",
        "learn: timm's learned position embedding; sincos: fixed 2-D sin-cos (MoCo-v3's ViT), not trained",
    )
    freeze_patch_embed: bool = _doc(
        False, "stop-gradient on the patch projection (MoCo-v3's ViT stabiliser): it stays at its random init"
    )
    stem: list[int] = _doc(
        [],
        "convolutional stem: channels of 3x3 stride-2 conv + batch-norm + ReLU layers ahead of the patch "
        "projection ([]: plain patchify); patch sizes must be multiples of its stride 2^len",
    )


@dataclass
class DataConfig:
    dataset: Dataset = _doc("fashion-mnist", "one of: " + ", ".join(DATASETS))
    root: str = _doc(
        "/usr/share/datasets/fashion-mnist",
        "dataset folder (fashion-mnist: idx files; cifar10: torchvision root; "
        "imagefolder: folder of class sub-folders, or one with train/ and val/; "
        "shards: the output of `accelvit prepare`)",
    )
    download: bool = _doc(False, "let torchvision download fashion-mnist / cifar10 into root")
    workers: int = _doc(2, "data-loader worker processes (0: load in the training process)")
    limit: int | None = _doc(None, "use only the first N training images (null: all)")
    crop_min_scale: float = _doc(0.08, "smallest area fraction of the random resized crop")
    augment: Literal["cpu", "device"] = _doc(
        "cpu",
        "cpu: lightly's per-image transforms in the loader workers; device: the loader only decodes and "
        "resizes to model.image_size, views are drawn in batches on the training device (accelvit.augment)",
    )
    on_bad_file: Literal["skip", "error"] = _doc(
        "skip", "an unreadable image file: skip it (the next image stands in, counted) or error"
    )
    views: Literal["objective", "simclr", "byol"] = _doc(
        "objective",
        "the view pair of a two-view objective: its reference's (objective: SimCLR's for simclr, BYOL's "
        "for mocov3), simclr (symmetric: blur 0.5, no solarization) or byol (view 1 always blurred, view 2 "
        "solarized 0.2, softer jitter); dino keeps its multi-crop",
    )


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = _doc("simclr", "pretraining objective: simclr, mocov3 or dino")
    temperature: float = _doc(
        0.2, "softmax temperature: of the contrastive loss (simclr, mocov3), of the student (dino, 0.1)"
    )
    hidden_dim: int = _doc(512, "projection (and prediction) head hidden width")
    out_dim: int = _doc(128, "head output width (dino: prototypes, 65536 in the paper)")
    momentum: float = _doc(0.99, "mocov3/dino: EMA momentum at the start, cosine to 1 at the end")
    bottleneck_dim: int = _doc(256, "dino: head bottleneck width")
    teacher_temp: float = _doc(0.04, "dino: teacher temperature after warm-up")
    warmup_teacher_temp: float = _doc(0.04, "dino: teacher temperature at the start")
    teacher_temp_warmup: float = _doc(0.3, "dino: fraction of training of the teacher-temperature warm-up")
    local_crops: int = _doc(0, "dino: number of small local crops per image (0: global crops only)")
    local_crop_size: int | None = _doc(
        None, "dino: local crop side in pixels (null: 96/224 of model.image_size, a multiple of patch_size)"
    )
    norm_last_layer: bool = _doc(
        True, "dino: fix the norm of the prototype layer (the reference's default; false for small ViTs)"
    )
    freeze_last_layer: float = _doc(
        0.01, "dino: fraction of training in which the prototype layer is not updated (reference: 1 epoch)"
    )


@dataclass
class EvalConfig:
    k: int = _doc(20, "neighbours of the weighted kNN classifier")
    temperature: float = _doc(0.07, "temperature of the kNN vote weights exp(sim / T)")
    train_limit: int | None = _doc(None, "kNN memory bank: first N train images (null: all)")
    test_limit: int | None = _doc(None, "evaluate on the first N test images (null: all)")
    batch_size: int = _doc(256, "images per forward pass when extracting features")
    linear: bool = _doc(False, "also train a linear probe on frozen features")
    linear_epochs: int = _doc(10, "epochs of the linear probe")
    encoder: Literal["student", "teacher"] | None = _doc(
        None,
        "encoder to evaluate and export: student, or teacher (the momentum encoder of mocov3 and dino); "
        "null: the objective's reference choice (dino: teacher, others: student)",
    )


@dataclass
class RampConfig:
    """How one compression knob moves over training progress (0 -> 1)."""

    shape: Shape = _doc("constant", "one of: " + ", ".join(SHAPES))
    start: float | None = _doc(None, "value at progress 0 (constant: the value)")
    end: float | None = _doc(None, "value at progress 1 (null: same as start)")
    points: list[list[float]] | None = _doc(
        None, "step shape only: [[progress, value], ...], value held until the next point"
    )
    choices: list[float] | None = _doc(
        None,
        "random shape only: values drawn afresh at every step from (train.seed, step), as FlexiViT "
        "samples a patch size per batch",
    )
    weights: list[float] | None = _doc(None, "random shape: relative probability of each choice (null: even)")


@dataclass
class ScheduleConfig:
    keep: RampConfig = _doc(RampConfig(start=1.0), "token keep ratio r in (0, 1]; a number means constant")
    patch: RampConfig = _doc(
        RampConfig(), "patch size in pixels (null start: model.patch_size); a number means constant"
    )
    merge: RampConfig = _doc(
        RampConfig(start=0.0),
        "token merging (ToMe): fraction of patch tokens each block merges away, in [0, 0.5]; 0: off",
    )
    dropout_views: Literal["query", "all"] = _doc(
        "query", "which views drop (and merge) tokens: query (gradient-carrying views only) or all"
    )
    keep_buckets: int | None = _doc(
        None,
        "round keep ratios up, merge fractions down, to multiples of 1/N (of 1/2N): a bounded number of "
        f"token counts, one compiled graph each (null: exact; {COMPILE_KEEP_BUCKETS} with train.compile)",
    )
    mode: Literal["fixed", "adaptive"] = _doc(
        "fixed", "fixed: keep/patch ramps; adaptive: measure CA-MSE at `stages` and switch"
    )
    stages: list[float] = _doc(
        [0.0, 0.25, 0.5, 0.75], "adaptive: progress points where the run picks the next stage's strategy"
    )
    candidates: str | None = _doc(
        None,
        "adaptive: keep:patch[:merge] strategies to choose from (null: a default grid); full input always",
    )
    adaptive_batches: int = _doc(
        8, "adaptive: batches (K) the estimator averages over at each stage (8: benchmarks/estimator_noise)"
    )
    monotone: bool = _doc(True, "adaptive: never pick a cheaper (more compressed) strategy than before")
    adaptive_metric: Literal["model", "groups", "descent"] = _doc(
        "model",
        "adaptive: CA-MSE of the whole gradient (model) or per parameter group, averaged (groups), or "
        "the expected loss decrease of an AdamW step per unit cost (descent)",
    )
    file: str | None = _doc(
        None, "YAML file with schedule keys (e.g. written by `accelvit plan`); its keys win over the recipe's"
    )


@dataclass
class OptimConfig:
    lr: float = _doc(1e-3, "peak learning rate of AdamW (no automatic batch-size scaling)")
    min_lr: float = _doc(0.0, "learning rate at the end of the cosine decay")
    weight_decay: float = _doc(
        0.05, "AdamW weight decay (not on biases, norms, prefix tokens, position embeddings, value_lambdas)"
    )
    weight_decay_end: float | None = _doc(
        None, "weight decay at the end of training, cosine from weight_decay (DINO: 0.04 -> 0.4; null: none)"
    )
    warmup: float = _doc(0.1, "fraction of training spent in linear learning-rate warm-up")
    decay: Literal["cosine", "poly"] = _doc(
        "cosine", "learning-rate decay after warm-up: cosine, or poly (power `poly_power`)"
    )
    poly_power: float = _doc(2.0, "power of the poly decay (2 is recommended for budgeted runs)")
    clip_grad: float | None = _doc(None, "clip the global gradient norm to this value")


@dataclass
class TrainConfig:
    steps: int | None = _doc(1000, "number of optimizer steps; progress is step / steps (null with budget)")
    budget: float | None = _doc(
        None,
        "run length in budget units (1 unit: a forward of the uncompressed backbone on one image); "
        "progress is budget_spent / budget",
    )
    batch_size: int = _doc(128, "images per step per process (global batch: x processes)")
    seed: int = _doc(0, "seed of model init, data order, augmentations and token dropout")
    log_every: int = _doc(10, "steps between lines of metrics.jsonl")
    eval_every: int | None = _doc(None, "steps between online kNN evaluations (null: none)")
    diagnostics_every: int | None = _doc(
        None, "steps between attention diagnostics on a fixed probe batch (diagnostics.jsonl; null: none)"
    )
    grad_error_at: list[float] = _doc([], "progress points at which to run the gradient-bias estimator")
    grad_error_batches: int = _doc(8, "batches (K) the estimator averages over during pretraining")
    grad_error_strategies: str | None = _doc(
        None, "keep:patch[:merge] list for the estimator, e.g. 0.5:4,0.25:8,1:4:0.2 (null: a default grid)"
    )
    checkpoint_every: int = _doc(200, "steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = _doc(2, "how many of the newest checkpoints to keep")
    compile: Literal["no", "default", "reduce-overhead", "max-autotune"] = _doc(
        "no",
        "torch.compile mode of the backbone forward (reduce-overhead: CUDA graphs), one graph per "
        "compression setting: the schedule's settings are bucketed (schedule.keep_buckets)",
    )
    precision: Literal["no", "fp16", "bf16"] = _doc(
        "no", "mixed precision: no, fp16 or bf16 (unset: the launcher's, accelerate launch --mixed_precision)"
    )
    on_nonfinite: Literal["stop", "skip"] = _doc(
        "stop", "non-finite loss or gradients: stop (checkpoint the last good state) or skip the step"
    )
    max_skipped: int = _doc(10, "on_nonfinite skip: stop after this many skipped steps in a row")
    process_timeout: float = _doc(
        600.0, "seconds a process waits for its peers at a collective before the run stops (a hung peer)"
    )
    on_save_error: Literal["stop", "warn"] = _doc(
        "stop", "a checkpoint cannot be written (disk full, I/O error): stop or warn"
    )
    log_with: list[Tracker] = _doc(
        [], "experiment trackers (accelerate's) mirroring metrics.jsonl, e.g. [tensorboard]; installed apart"
    )


@dataclass
class CostConfig:
    model: Literal["flops", "measured"] = _doc(
        "flops", "cost of a step: flops (analytic, deterministic) or measured (timed at start)"
    )
    repeats: int = _doc(3, "measured: timed repetitions per setting (the median is kept)")


@dataclass
class Config:
    model: ModelConfig = _doc(ModelConfig(), "backbone")
    data: DataConfig = _doc(DataConfig(), "training data and views")
    objective: ObjectiveConfig = _doc(ObjectiveConfig(), "self-supervised objective")
    schedule: ScheduleConfig = _doc(ScheduleConfig(), "compression curriculum")
    optim: OptimConfig = _doc(OptimConfig(), "optimizer and learning-rate schedule")
    train: TrainConfig = _doc(TrainConfig(), "loop length, batch, logging, checkpoints")
    cost: CostConfig = _doc(CostConfig(), "how a step's cost is counted against train.budget")
    eval: EvalConfig = _doc(EvalConfig(), "kNN (and linear probe) evaluation of the backbone")


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> (overrides) -> dataclasses -> semantic checks


def load_config(path: str | Path | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a recipe, apply `section.key=value` overrides and validate the result.

    `check_paths=False` skips checks of the file system (for commands that read no data).

    Raises:
        ConfigError: one line naming the file, key or value at fault.
    """
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    _merge_schedule_file(raw)
    _take_launcher_settings(raw)
    train = raw.get("train")
    if isinstance(train, dict) and train.get("budget") is not None and "steps" not in train:
        train["steps"] = None  # a budget replaces the default number of steps
    cfg = from_dict(Config, raw, "")
    if cfg.train.compile != "no" and cfg.schedule.keep_buckets is None:
        cfg.schedule.keep_buckets = COMPILE_KEEP_BUCKETS  # written into the run's recipe.yaml
    validate(cfg, check_paths)
    return cfg


# What `accelerate launch` (its flags or `accelerate config`) passes to the processes, as ACCELERATE_*
# variables an Accelerator would pick up silently, and that accelvit's loop does not do.
UNSUPPORTED_LAUNCHER = {
    "ACCELERATE_DYNAMO_BACKEND": (
        "--dynamo_backend (torch.compile of the whole model) is not supported: a curriculum would "
        "recompile at every new patch size and keep ratio; use train.compile instead"
    ),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
        "--gradient_accumulation_steps is not supported: the loop steps the optimizer every batch; raise "
        "train.batch_size or the number of processes instead"
    ),
    "ACCELERATE_USE_FSDP": "FSDP is not supported: accelvit trains with DDP (the ViTs it targets fit a GPU)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed is not supported: accelvit trains with DDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM is not supported: accelvit trains with DDP",
}


def _asks(name: str, value: str) -> bool:
    """Whether a launcher variable asks for its feature: a backend other than no, more than one
    accumulation step, a true flag."""
    value = value.strip().lower()
    if name == "ACCELERATE_DYNAMO_BACKEND":
        return value not in ("", "no")
    if name == "ACCELERATE_GRADIENT_ACCUMULATION_STEPS":
        return value not in ("", "0", "1")
    return value in ("1", "true", "yes")


def _take_launcher_settings(raw: dict) -> None:
    """Refuse the launcher settings the loop does not do; take its mixed precision when the recipe
    sets none, and refuse one that contradicts the recipe's."""
    for name, why in UNSUPPORTED_LAUNCHER.items():
        if _asks(name, os.environ.get(name, "")):
            raise ConfigError(f"accelerate launch: {why} ({name}={_excerpt(os.environ[name])})")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    train = raw.setdefault("train", {})
    if launcher == "no" or not isinstance(train, dict):
        return
    recipe = train.get("precision")
    if recipe is None:
        train["precision"] = launcher
    elif recipe != launcher:
        raise ConfigError(
            f"train.precision = {_excerpt(recipe)}: the launcher asks {launcher} (accelerate launch "
            "--mixed_precision or accelerate config); set one of them"
        )


MAX_INCLUDE_DEPTH = 8
MAX_YAML_NODES = 100_000  # a recipe is small; more nodes after alias expansion is an alias bomb


def read_yaml(path: str | Path, what: str = "recipe", _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; `!include FILE` inserts another file's mapping.

    An included file is named relative to the including file and must lie inside the folder of the
    recipe the chain started from (no absolute paths, no escaping with ..); include cycles, chains
    deeper than MAX_INCLUDE_DEPTH, files that are not UTF-8 and alias expansions past MAX_YAML_NODES
    are refused with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, resolved))
        raise ConfigError(f"{path}: !include cycle ({cycle})")
    if len(_chain) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: !include chain deeper than {MAX_INCLUDE_DEPTH} files")
    chain = (*_chain, resolved)
    root = chain[0].parent

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            # YAML lets a later key silently replace an earlier one: in a recipe that is a mistake
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(
                        f"{path}: line {key_node.start_mark.line + 1}: key {_excerpt(key)} given twice "
                        f"(first on line {seen[key] + 1})"
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    def include(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
        name = loader.construct_scalar(node)
        target = path.parent / name
        if Path(name).is_absolute() or not target.resolve().is_relative_to(root):
            raise ConfigError(f"{path}: !include {_excerpt(name)}: must name a file inside {root}")
        return read_yaml(target, "included", chain)

    Loader.add_constructor("!include", include)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
                raise ConfigError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES} nodes")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping, got {type(data).__name__}")
    return data


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of the document with every alias expanded (aliases share nodes; the memo keeps it linear)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive structure counts once per visit
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[key]


def _merge_schedule_file(raw: dict) -> None:
    """Merge `schedule.file` into the schedule section; the resolved recipe then no longer needs it."""
    schedule = raw.get("schedule")
    if not isinstance(schedule, dict) or not schedule.get("file"):
        return
    loaded = read_yaml(schedule["file"], "schedule.file")
    loaded = loaded.get("schedule", loaded)  # a whole recipe or just the schedule section
    if not isinstance(loaded, dict):
        raise ConfigError(f"schedule.file {schedule['file']}: expected a mapping of schedule keys")
    raw["schedule"] = {**schedule, **loaded, "file": None}


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set section.key=value` (value parsed as YAML) to the raw recipe dict."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
    parts = key.strip().split(".")
    _check_path(parts, f"--set {key}")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            # A ramp given as a plain number is widened so that a sub-key can be set.
            child = {"shape": "constant", "start": child} if isinstance(child, (int, float)) else {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(parts: list[str], where: str) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} has no sub-keys")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(_unknown(".".join(parts[: i + 1]), part, names, where))
        cls = _hints(cls)[part]
        cls = _unwrap_optional(cls)


def _unknown(key: str, name: str, names: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    parent = key.rpartition(".")[0]
    suggestion = f"{parent}.{close[0]}" if close and parent else (close[0] if close else "")
    hint = f" (did you mean '{suggestion}'?)" if close else f" (known: {', '.join(names)})"
    prefix = f"{where}: " if where and where != key else ""
    return f"{prefix}unknown key '{key}'{hint}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a dict, checking keys and types; `path` names it in errors."""
    if cls is RampConfig and isinstance(data, (int, float)) and not isinstance(data, bool):
        data = {"shape": "constant", "start": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown(f"{path}.{key}" if path else str(key), str(key), names))
    values = {}
    for name in names:
        if name in data:
            key = f"{path}.{name}" if path else name
            values[name] = _coerce(hints[name], data[name], key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if _is_optional(tp):
        return None if value is None else _coerce(_unwrap_optional(tp), value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a list")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected one of {list(typing.get_args(tp))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e9 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a string")
        return value
    raise TypeError(f"unsupported recipe type {tp} for {key}")  # a bug in this module


# ---------------------------------------------------------------------------------------------
# Semantic checks


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {_excerpt(value)}: {why}")


def _excerpt(value: Any, limit: int = 60) -> str:
    """The value as an error message shows it: its repr, cut short, and a mapping or list by its
    type and size only (it may be a whole file brought in by !include, secrets and all)."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key{'s' * (len(value) != 1)}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# ---------------------------------------------------------------------------------------------
# Writing


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved recipe as YAML; loading it again gives an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_defaults() -> str:
    """Every recipe key with its default and meaning, as a commented YAML recipe."""
    lines = ["# accelvit recipe: every key, its default and its meaning"]

    def walk(instance: Any, indent: int) -> None:
        for f in dataclasses.fields(instance):
            value = getattr(instance, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {f.metadata['doc']}")
                walk(value, indent + 1)  # the field's own default (e.g. keep starts at 1.0)
            else:
                text = yaml.safe_dump(value, default_flow_style=True).strip()
                text = text.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"{pad}{f.name}: {text}  # {f.metadata['doc']}")

    walk(Config(), 0)
    return "\n".join(lines) + "\n"


def defaults_markdown() -> str:
    """Every recipe key as Markdown: one table per section (key, default, meaning); the page
    docs/recipe-keys.md is this, and a test keeps it so."""
    out = [
        "# Recipe keys",
        "",
        "Generated by `accelvit defaults --markdown` from the recipe schema; do not edit by hand.",
        "A recipe sets any of them; `--set section.key=value` overrides one on the command line.",
    ]

    def rows(instance: Any, prefix: str) -> list[str]:
        found = []
        for f in dataclasses.fields(instance):
            value, key = getattr(instance, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                found += rows(value, f"{key}.")
                continue
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            meaning = f.metadata["doc"].replace("|", "\\|")
            found.append(f"| `{key}` | `{text}` | {meaning} |")
        return found

    config = Config()
    for f in dataclasses.fields(config):
        out += ["", f"## {f.name}", "", f.metadata["doc"], "", "| key | default | meaning |", "|---|---|---|"]
        out += rows(getattr(config, f.name), f"{f.name}.")
    return "\n".join(out) + "\n"
