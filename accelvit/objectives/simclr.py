"""SimCLR (Chen et al., ICML 2020): two views, projection head, NT-Xent loss.

Both views carry gradients, so both are compressed (token dropout, merging and patch scaling alike).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from accelvit.augment import ViewSpec
from accelvit.budget import Branch
from accelvit.compress import forward_features
from accelvit.config import DataConfig, ModelConfig, ObjectiveConfig
from accelvit.monitor import feature_monitors
from accelvit.setting import Setting


class SimCLR(nn.Module):
    """Backbone + SimCLR projection head; `forward(views, setting)` returns the loss."""

    def __init__(self, cfg: ObjectiveConfig, backbone: VisionTransformer, dropout_views: str):
        super().__init__()
        self.backbone = backbone
        self.head = SimCLRProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.out_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)
        self.monitors: dict[str, torch.Tensor] = {}

    def forward(self, views: list[torch.Tensor], setting: Setting, progress: float) -> torch.Tensor:
        """Loss for two batches of views, each (B, C, H, W); one backbone pass over both."""
        x0, x1 = views
        features = forward_features(self.backbone, torch.cat([x0, x1]), setting)
        self.monitors = feature_monitors(features[: len(x0)])
        z = self.head(features)
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1)

    def cancel_gradients(self, progress: float) -> None:
        """Every parameter is trained at every step."""

    def update_momentum(self, progress: float, ok: torch.Tensor | None = None) -> None:
        """SimCLR has no momentum encoder."""


def branches(cfg: ObjectiveConfig, model: ModelConfig, dropout_views: str) -> list[Branch]:
    """The encoder passes of a step, for the cost model: both views carry gradients and drop tokens."""
    return [Branch(views=2, size=model.image_size, backward=True, drops_tokens=True)]


def view_specs(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> list[ViewSpec]:
    """The two views of `build_transform`, drawn on the device (`data.augment: device`)."""
    return [ViewSpec(size=model.image_size, scale=(data.crop_min_scale, 1.0))] * 2


def build_transform(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> Callable:
    """Two SimCLR views (random resized crop, flip, colour jitter, grey, blur) per image."""
    return SimCLRTransform(input_size=model.image_size, min_scale=data.crop_min_scale)
