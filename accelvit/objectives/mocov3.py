"""MoCo-v3 (Chen, Xie and He, ICCV 2021): query encoder with projection and prediction heads,
momentum key encoder, symmetric contrastive loss against the other view's keys.

Token dropout goes to the query views (the gradient-carrying branch); keys see the full token set
unless `schedule.dropout_views: all`. Patch scaling applies to queries and keys alike.

As in the reference builder (facebookresearch/moco-v3, `moco/builder.py`), each view passes the
encoders on its own, so batch norm in the heads normalises over one view's batch, and the last batch
norm of projector and predictor has no affine parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.utils import dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from accelvit.augment import ViewSpec
from accelvit.budget import Branch
from accelvit.compress import forward_features
from accelvit.config import DataConfig, ModelConfig, ObjectiveConfig
from accelvit.monitor import feature_monitors
from accelvit.objectives.momentum import momentum_at, momentum_where
from accelvit.setting import Setting


def contrastive_loss(
    query: torch.Tensor, key: torch.Tensor, temperature: float, gather: bool = True
) -> torch.Tensor:
    """MoCo-v3's InfoNCE: each query against every key of the global batch, scaled by 2 * T.

    lightly's NTXentLoss also contrasts queries with queries, so the paper's loss is written here.

    Args:
        query: (B, D) from the query encoder; key: (B, D) from the momentum encoder (no grad).
        gather: use the keys of every process as negatives (False: this process's only).
    """
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    gather = gather and dist.world_size() > 1
    keys = torch.cat(dist.gather(key)) if gather else key
    logits = query @ keys.T / temperature
    offset = dist.rank() * len(query) if gather else 0
    labels = torch.arange(len(query), device=query.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int) -> ProjectionHead:
    """The reference's `_build_mlp`: Linear (no bias) + BN + ReLU blocks, a last BN without affine."""
    blocks = [
        (input_dim if i == 0 else hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU())
        for i in range(num_layers - 1)
    ]
    blocks.append((hidden_dim, output_dim, nn.BatchNorm1d(output_dim, affine=False), None))
    return ProjectionHead(blocks)


class MoCoV3(nn.Module):
    """Query encoder (backbone, projection, prediction) and momentum key encoder."""

    def __init__(self, cfg: ObjectiveConfig, backbone: VisionTransformer, dropout_views: str):
        super().__init__()
        self.backbone = backbone
        self.projection = mlp(3, backbone.num_features, cfg.hidden_dim, cfg.out_dim)
        self.prediction = mlp(2, cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.momentum_backbone)
        deactivate_requires_grad(self.momentum_projection)
        self.temperature = cfg.temperature
        self.momentum = cfg.momentum
        self.drop_keys = dropout_views == "all"
        self.gather_distributed = True  # negatives from every process
        self.monitors: dict[str, torch.Tensor] = {}

    def forward(self, views: list[torch.Tensor], setting: Setting, progress: float) -> torch.Tensor:
        """Symmetric loss of two views (B, C, H, W): each view is the query once.

        One encoder pass per view: batch norm sees B images, never both views at once.
        """
        features = [forward_features(self.backbone, x, setting) for x in views]
        self.monitors = feature_monitors(features[0])
        q0, q1 = (self.prediction(self.projection(f)) for f in features)
        with torch.no_grad():
            key_setting = setting if self.drop_keys else setting.full_tokens()
            k0, k1 = (
                self.momentum_projection(forward_features(self.momentum_backbone, x, key_setting))
                for x in views
            )
        t, gather = self.temperature, self.gather_distributed
        return contrastive_loss(q0, k1, t, gather) + contrastive_loss(q1, k0, t, gather)

    def cancel_gradients(self, progress: float) -> None:
        """Every parameter is trained at every step."""

    @torch.no_grad()
    def update_momentum(self, progress: float, ok: torch.Tensor | None = None) -> None:
        m = momentum_where(momentum_at(self.momentum, progress), ok)
        update_momentum(self.backbone, self.momentum_backbone, m)
        update_momentum(self.projection, self.momentum_projection, m)


def branches(cfg: ObjectiveConfig, model: ModelConfig, dropout_views: str) -> list[Branch]:
    """The encoder passes of a step, for the cost model: two query views, two key views."""
    return [
        Branch(views=2, size=model.image_size, backward=True, drops_tokens=True),
        Branch(views=2, size=model.image_size, backward=False, drops_tokens=dropout_views == "all"),
    ]


def view_specs(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> list[ViewSpec]:
    """BYOL's two views (`build_transform`), drawn on the device (`data.augment: device`)."""
    byol = ViewSpec(
        size=model.image_size,
        scale=(data.crop_min_scale, 1.0),
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
    )
    return [replace(byol, blur=1.0), replace(byol, blur=0.1, solarize=0.2)]


def build_transform(cfg: ObjectiveConfig, model: ModelConfig, data: DataConfig) -> Callable:
    """BYOL's asymmetric views as MoCo-v3 uses them: blur always in view 1, solarize in view 2."""
    size, scale = model.image_size, data.crop_min_scale
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, min_scale=scale),
        view_2_transform=BYOLView2Transform(input_size=size, min_scale=scale),
    )
