"""The backbone: a plain timm VisionTransformer built from the recipe (random init, no download)."""

from __future__ import annotations

import timm
from timm.models.vision_transformer import VisionTransformer

from accelvit.arch import attach
from accelvit.budget import VitShape
from accelvit.config import ConfigError, ModelConfig


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `timm.create_model(cfg.arch, **kwargs)` that rebuild this backbone."""
    kwargs: dict = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
    }
    for name in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    return kwargs


def build_backbone(cfg: ModelConfig) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier head; `forward` gives pooled features."""
    if cfg.arch not in timm.list_models("vit_*") and cfg.arch not in timm.list_models("deit*"):
        raise ConfigError(f"model.arch = {cfg.arch!r}: not a timm ViT name (see timm.list_models)")
    try:
        vit = timm.create_model(cfg.arch, **timm_kwargs(cfg))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"model.arch = {cfg.arch!r}: timm cannot build it: {exc}") from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model.arch = {cfg.arch!r}: builds a {type(vit).__name__}, not a ViT")
    return attach(vit, cfg)


def vit_shape(vit: VisionTransformer, image_size: int) -> VitShape:
    """The numbers the cost model needs, read off a built ViT."""
    block = vit.blocks[0]
    hidden = block.mlp.fc1.out_features
    return VitShape(
        image_size=image_size,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        mlp_ratio=hidden / vit.embed_dim,
        prefix_tokens=vit.num_prefix_tokens,
        in_chans=vit.patch_embed.proj.in_channels,
        num_heads=block.attn.num_heads,
    )
