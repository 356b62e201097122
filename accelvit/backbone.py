"""The backbone: a timm VisionTransformer built from the recipe (random init, no download).

With `model.stem` the patch embedding is timm's `HybridEmbed`: a convolutional stem (Xiao et al.,
"Early convolutions help transformers see better", NeurIPS 2021) of 3x3 stride-2 conv, batch-norm and
ReLU layers, whose output map the patch projection embeds in cells of patch_size / 2^len(stem).

MoCo-v3's ViT stabilisers (Chen, Xie and He, ICCV 2021, `vits.py`) are options: a fixed 2-D sin-cos
position embedding (`model.pos_embed: sincos`) and a frozen random patch projection
(`model.freeze_patch_embed`). Both stay parameters of the base size, so patch scaling still resamples
them from the frozen base.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
from timm.layers import ConvNormAct, build_sincos2d_pos_embed
from timm.layers.hybrid_embed import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from accelvit.arch import attach
from accelvit.budget import VitShape
from accelvit.config import ConfigError, ModelConfig
from accelvit.setting import stem_stride

RGB = 3  # timm's ViTs take 3 channels; the data pipeline gives grayscale images as RGB


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `timm.create_model(cfg.arch, **kwargs)` that rebuild this backbone."""
    kwargs: dict = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size // stem_stride(cfg.stem),  # a stem's projection counts cells of its map
    }
    for name in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    return kwargs


def build_backbone(cfg: ModelConfig) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier head; `forward` gives pooled features."""
    if cfg.arch not in timm.list_models("vit_*") and cfg.arch not in timm.list_models("deit*"):
        raise ConfigError(f"model.arch = {cfg.arch!r}: not a timm ViT name (see timm.list_models)")
    kwargs = timm_kwargs(cfg)
    if cfg.stem:
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=conv_stem(RGB, cfg.stem))
    try:
        vit = timm.create_model(cfg.arch, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"model.arch = {cfg.arch!r}: timm cannot build it: {exc}") from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model.arch = {cfg.arch!r}: builds a {type(vit).__name__}, not a ViT")
    if isinstance(vit.patch_embed, HybridEmbed) and not cfg.stem:
        raise ConfigError(f"model.arch = {cfg.arch!r}: a hybrid CNN-ViT; use a plain ViT with model.stem")
    if cfg.pos_embed == "sincos":
        set_sincos_pos_embed(vit)
    if cfg.freeze_patch_embed:
        vit.patch_embed.proj.requires_grad_(False)
    return attach(vit, cfg)


def set_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Replace the learned position embedding by a fixed 2-D sin-cos one (prefix slots zero).

    timm's `build_sincos2d_pos_embed` orders the channels [sin h, sin w, cos h, cos w]; MoCo-v3's is a
    fixed permutation of that, which the first linear layer absorbs.
    """
    if vit.pos_embed is None or vit.embed_dim % 4:
        raise ConfigError(
            f"model.pos_embed = 'sincos': needs a position embedding and an embed_dim divisible by 4, "
            f"got {vit.embed_dim}"
        )
    grid = list(vit.patch_embed.grid_size)
    table = build_sincos2d_pos_embed(grid, vit.embed_dim)  # (H * W, D)
    prefix = vit.pos_embed.shape[1] - table.shape[0]
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([torch.zeros(prefix, vit.embed_dim), table])[None])
    vit.pos_embed.requires_grad_(False)


def conv_stem(in_chans: int, channels: list[int]) -> nn.Sequential:
    """3x3 stride-2 conv + batch norm + ReLU per entry of `channels`."""
    layers = []
    for out_chans in channels:
        layers.append(ConvNormAct(in_chans, out_chans, 3, stride=2, padding=1))
        in_chans = out_chans
    return nn.Sequential(*layers)


def vit_shape(vit: VisionTransformer, image_size: int) -> VitShape:
    """The numbers the cost model needs, read off a built ViT."""
    block, embed = vit.blocks[0], vit.patch_embed
    hidden = block.mlp.fc1.out_features
    stem = isinstance(embed, HybridEmbed)
    return VitShape(
        image_size=image_size,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        mlp_ratio=hidden / vit.embed_dim,
        prefix_tokens=vit.num_prefix_tokens,
        in_chans=embed.in_chans if stem else embed.proj.in_channels,
        num_heads=block.attn.num_heads,
        stem=tuple(layer.conv.out_channels for layer in embed.backbone) if stem else (),
    )
