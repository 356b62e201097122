"""The recipe schema: every key as a dataclass field with its default and meaning (`_doc`), the
value vocabularies, and `ConfigError`, the one-line error every recipe problem becomes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

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
    head_batch_norm: bool = _doc(
        False,
        "dino: batch norm after the head's hidden layers (the reference's use_bn_in_head, its ResNet "
        "setting; speeds up small ViTs trained briefly)",
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
    adaptive_metric: Literal["model", "groups", "descent", "lookahead"] = _doc(
        "model",
        "adaptive: CA-MSE of the whole gradient (model) or per parameter group, averaged (groups), "
        "the expected loss decrease of an AdamW step per unit cost (descent), or the full-input loss "
        "decrease after training each candidate for the same budget from the current state (lookahead; "
        "`adaptive_batches` held-out batches)",
    )
    lookahead_steps: int = _doc(
        8,
        "adaptive lookahead: each candidate's training budget, full-input steps (1/c as many at cost c)",
    )
    lookahead_settle: float = _doc(
        0.0,
        "adaptive lookahead: share of each candidate's budget trained before the first held-out reading; "
        "the loss decrease is read over the rest, so that a switch's transient does not decide a stage",
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
    grad_error_lookahead: bool = _doc(
        False,
        "at each grad_error_at point also measure the lookahead criterion (every strategy trains "
        "schedule.lookahead_steps full steps' worth, undone after; K held-out batches), for "
        "`accelvit plan --metric lookahead`",
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


def _excerpt(value: Any, limit: int = 60) -> str:
    """The value as an error message shows it: its repr, cut short, and a mapping or list by its
    type and size only (it may be a whole file brought in by !include, secrets and all)."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key{'s' * (len(value) != 1)}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
