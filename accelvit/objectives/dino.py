"""DINO (Caron et al., ICCV 2021): student and momentum teacher with DINO heads, multi-crop views,
cross-entropy to the centred, sharpened teacher output.

The teacher sees the two global crops; the student sees all crops. Token dropout goes to the
student's views (global and local); the teacher sees full token sets unless
`schedule.dropout_views: all`. Patch scaling applies to every view: local crops use the allowed
patch size of their own resolution nearest to the step's patch size (`patch_for_size`).

As in the reference (facebookresearch/dino, `main_dino.py`): the prototype (last) layer is not updated
for the first `objective.freeze_last_layer` of training, and its norm is fixed unless
`objective.norm_last_layer: false` (the reference's advice for small ViTs). kNN evaluation and export
use the teacher by default (`eval.encoder`), which the paper finds better throughout training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from accelvit.augment import ViewSpec
from accelvit.budget import Branch
from accelvit.compress import base_patch_size, forward_features, vit_stem_stride
from accelvit.config import DataConfig, ModelConfig, ObjectiveConfig
from accelvit.monitor import feature_monitors, teacher_monitors
from accelvit.objectives.momentum import momentum_at, momentum_where
from accelvit.setting import Setting, patch_for_size


class DINO(nn.Module):
    """Student (backbone + DINO head) and EMA teacher; `forward` returns the DINO loss."""

    def __init__(self, cfg: ObjectiveConfig, backbone: VisionTransformer, dropout_views: str):
        super().__init__()
        self.backbone = backbone

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(
                backbone.num_features,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.out_dim,
                batch_norm=cfg.head_batch_norm,
                freeze_last_layer=1,  # "epoch" 0 is the frozen span: see `cancel_gradients`
                norm_last_layer=cfg.norm_last_layer,
            )

        self.head = head()
        self.teacher_backbone = copy.deepcopy(backbone)
        # The head's weight norm cannot be deep-copied; the teacher starts from the student's weights.
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            student_temp=cfg.temperature,
        )
        self.cfg = cfg
        self.drop_teacher = dropout_views == "all"
        self.monitors: dict[str, torch.Tensor] = {}

    def teacher_temp(self, progress: float) -> float:
        """Linear warm-up of the teacher temperature over `teacher_temp_warmup` of training."""
        cfg = self.cfg
        if progress >= cfg.teacher_temp_warmup:
            return cfg.teacher_temp
        frac = progress / cfg.teacher_temp_warmup
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * frac

    def forward(self, views: list[torch.Tensor], setting: Setting, progress: float) -> torch.Tensor:
        """Loss of 2 global views (B, C, H, W) and any number of smaller local views."""
        global_views, local_views = views[:2], views[2:]
        with torch.no_grad():
            teacher_setting = setting if self.drop_teacher else setting.full_tokens()
            teacher = self.teacher_head(
                forward_features(self.teacher_backbone, torch.cat(global_views), teacher_setting)
            )
        features = forward_features(self.backbone, torch.cat(global_views), setting)
        student = list(self.head(features).chunk(2))
        temp = self.teacher_temp(progress)
        center = self.criterion.center  # before this batch updates it: the one the loss uses
        first_view = features[: len(global_views[0])]
        self.monitors = {**feature_monitors(first_view), **teacher_monitors(teacher, center, temp)}
        if local_views:
            size = local_views[0].shape[-1]
            local_patch = patch_for_size(
                setting.patch, size, base_patch_size(self.backbone), vit_stem_stride(self.backbone)
            )
            local = self.head(
                forward_features(self.backbone, torch.cat(local_views), replace(setting, patch=local_patch))
            )
            student += list(local.chunk(len(local_views)))
        return self.criterion(list(teacher.chunk(2)), student, teacher_temp=temp)

    def cancel_gradients(self, progress: float) -> None:
        """Drop the prototype layer's gradients in the frozen span (the reference: its first epoch)."""
        if progress < self.cfg.freeze_last_layer:
            self.head.cancel_last_layer_gradients(current_epoch=0)

    @torch.no_grad()
    def update_momentum(self, progress: float, ok: torch.Tensor | None = None) -> None:
        m = momentum_where(momentum_at(self.cfg.momentum, progress), ok)
        update_momentum(self.backbone, self.teacher_backbone, m)
        update_momentum(self.head, self.teacher_head, m)


def local_crop_size(image_size: int, base_patch: int) -> int:
    """DINO's 96/224 ratio, rounded down to a multiple of the base patch (at least one patch)."""
    return max(base_patch, (image_size * 96 // 224) // base_patch * base_patch)


def branches(cfg: ObjectiveConfig, model: ModelConfig, dropout_views: str) -> list[Branch]:
    """The encoder passes of a step, for the cost model: student global and local crops, teacher global."""
    size = model.image_size
    local = cfg.local_crop_size or local_crop_size(size, model.patch_size)
    passes = [
        Branch(views=2, size=size, backward=True, drops_tokens=True),
        Branch(views=2, size=size, backward=False, drops_tokens=dropout_views == "all"),
    ]
    if cfg.local_crops:
        passes.append(Branch(views=cfg.local_crops, size=local, backward=True, drops_tokens=True))
    return passes


def view_specs(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> list[ViewSpec]:
    """The crops of `build_transform`, drawn on the device (`data.augment: device`)."""
    dino = ViewSpec(size=model.image_size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    global_scale = (0.4, 1.0) if cfg.local_crops else (0.14, 1.0)
    local = replace(
        dino,
        size=cfg.local_crop_size or local_crop_size(model.image_size, model.patch_size),
        scale=(0.05, 0.4),
    )
    return [
        replace(dino, scale=global_scale, blur=1.0),
        replace(dino, scale=global_scale, blur=0.1, solarize=0.2),
        *[local] * cfg.local_crops,
    ]


def build_transform(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> Callable:
    """Two global crops at `model.image_size` and `objective.local_crops` smaller local crops.

    Crop scales are the paper's: global (0.4, 1) with local crops, (0.14, 1) without; local (0.05, 0.4).
    """
    local_size = cfg.local_crop_size or local_crop_size(model.image_size, model.patch_size)
    return DINOTransform(
        global_crop_size=model.image_size,
        global_crop_scale=(0.4, 1.0) if cfg.local_crops else (0.14, 1.0),
        local_crop_size=local_size,
        n_local_views=cfg.local_crops,
    )
