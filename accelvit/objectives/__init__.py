"""Pretraining objectives: a plain dict from `objective.name` to how to build it.

An objective is an `nn.Module` built as `build(cfg, backbone, dropout_views)` whose
`forward(views, setting, progress)` returns the loss (and leaves its collapse monitors, detached, in
`monitors`), whose `cancel_gradients(progress)` runs between backward and the optimizer step and
whose `update_momentum(progress, ok)` runs after it (`ok`: a device flag, false for a skipped step),
plus `transform(objective_cfg, model_cfg, data_cfg)` that turns one image into its list of views and
`branches(objective_cfg, model_cfg, dropout_views)` that lists a step's encoder passes for the cost
model.
A new objective is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from accelvit.augment import BaseImage, ViewSpec
from accelvit.budget import Branch
from accelvit.config import Config, ObjectiveName
from accelvit.objectives import dino, mocov3, simclr


@dataclass(frozen=True)
class Objective:
    build: Callable[..., nn.Module]
    transform: Callable[..., Callable]
    branches: Callable[..., list[Branch]]
    view_specs: Callable[..., list[ViewSpec]]  # data.augment: device
    teacher: str | None = None  # attribute of the momentum (EMA) backbone, if the objective has one
    evaluates: str = "student"  # the encoder the reference evaluates: student or teacher


def buffer_restorer(model: nn.Module) -> Callable[..., None]:
    """Snapshot `model`'s buffers (batch-norm statistics, DINO's centre); the result puts them back,
    or, given `unless` (a device flag), keeps the new values where it is true.

    For passes that must leave no trace: measuring, timing, and steps skipped as non-finite.
    """
    saved = {k: v.clone() for k, v in model.named_buffers()}

    def restore(unless: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k] if unless is None else torch.where(unless, v, saved[k]))

    return restore


OBJECTIVES: dict[ObjectiveName, Objective] = {
    "simclr": Objective(
        build=simclr.SimCLR,
        transform=simclr.build_transform,
        branches=simclr.branches,
        view_specs=simclr.view_specs,
    ),
    "mocov3": Objective(
        build=mocov3.MoCoV3,
        transform=mocov3.build_transform,
        branches=mocov3.branches,
        view_specs=mocov3.view_specs,
        teacher="momentum_backbone",  # the reference evaluates and fine-tunes the base encoder
    ),
    "dino": Objective(
        build=dino.DINO,
        transform=dino.build_transform,
        branches=dino.branches,
        view_specs=dino.view_specs,
        teacher="teacher_backbone",
        evaluates="teacher",  # DINO's kNN uses the teacher, better throughout training (its section 5.2)
    ),
}


def encoder_name(objective: str, encoder: str | None) -> str:
    """The model attribute holding the backbone to evaluate and export (`eval.encoder`)."""
    entry = OBJECTIVES[objective]
    if (encoder or entry.evaluates) == "student":
        return "backbone"
    if entry.teacher is None:
        raise ValueError(f"objective {objective} has no teacher (momentum) encoder")
    return entry.teacher


# data.views: the objective whose reference defines the named view pair
VIEW_PAIRS: dict[str, ObjectiveName] = {"simclr": "simclr", "byol": "mocov3"}


def view_pipeline(cfg: Config) -> tuple:
    """(per-image loader transform, per-batch view specs or None) for `data.augment` of `cfg`."""
    objective = OBJECTIVES[VIEW_PAIRS.get(cfg.data.views, cfg.objective.name)]
    if cfg.data.augment == "device":
        return BaseImage(cfg.model.image_size), objective.view_specs(cfg.objective, cfg.model, cfg.data)
    return objective.transform(cfg.objective, cfg.model, cfg.data), None
