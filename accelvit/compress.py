"""Applying a compression setting (keep, patch) to a timm VisionTransformer.

- Patch scaling (FlexiViT, Beyer et al., CVPR 2023): the image keeps its resolution and is embedded
  with patch size p >= base. The kernel is resampled from the *base* kernel by timm's pseudo-inverse
  resize inside the autograd graph, so gradients reach the one base parameter the optimizer holds;
  the position embedding is resampled to the new grid. With a convolutional stem (`model.stem`)
  the image first passes the stem and the kernel, in cells of the stem's map, is resampled the same way.
- Token dropout (PatchDropout, Liu et al., 2022): after position embeddings each image keeps a fresh
  random subset of round(keep * N) patch tokens; prefix (class, register) tokens are always kept.
- Token merging (ToMe, `accelvit.merge`): inside each block a fraction `merge` of the remaining
  patch tokens is merged into its most similar partners.

With keep 1, the base patch size and no merging the forward is exactly timm's `forward_features`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.layers.hybrid_embed import HybridEmbed
from timm.layers.patch_dropout import patch_dropout_forward
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from timm.models.vision_transformer import VisionTransformer

from accelvit.arch import Observer, options, precondition_tokens, run_blocks
from accelvit.setting import Setting, kept_patches

_RESAMPLERS: dict[int, PatchEmbedResamplerFixedOrigSize] = {}


def _resampler(base: int) -> PatchEmbedResamplerFixedOrigSize:
    # One per base size; it caches the pseudo-inverse per (new size, device, dtype). A plain dict,
    # not functools.cache: dynamo traces through the cache into a fresh resampler, and its empty
    # cache put the pseudo-inverse into every step of a compiled graph.
    if base not in _RESAMPLERS:
        _RESAMPLERS[base] = PatchEmbedResamplerFixedOrigSize(orig_size=(base, base))
    return _RESAMPLERS[base]


# (kernel, device) pairs each resampler has prewarmed: asking timm again costs 14 us a forward
_WARMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prewarm(vit: VisionTransformer, patch: int) -> None:
    """The pseudo-inverse of `patch`'s resampling, computed eagerly: a graph about to be compiled
    then finds it cached and takes it as a constant."""
    base, kernel = vit.patch_embed.proj.kernel_size[0], patch // vit_stem_stride(vit)
    if kernel == base:
        return
    resampler, device = _resampler(base), vit.patch_embed.proj.weight.device
    warmed = _WARMED.setdefault(resampler, set())
    if (kernel, device) not in warmed:
        resampler.prewarm([kernel], device)
        warmed.add((kernel, device))


def vit_stem_stride(vit: VisionTransformer) -> int:
    """Pixels per cell of the convolutional stem's output map (1: no stem)."""
    pe = vit.patch_embed
    return pe.feature_ratio[0] if isinstance(pe, HybridEmbed) else 1


def base_patch_size(vit: VisionTransformer) -> int:
    """The base patch size in pixels."""
    return vit.patch_embed.proj.kernel_size[0] * vit_stem_stride(vit)


def embed_tokens(vit: VisionTransformer, images: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch-embed `images` (B, C, H, W) with patch size `patch` and add position embeddings.

    Returns:
        Tokens (B, prefix + (H // patch) * (W // patch), D), prefix tokens first.
    """
    pe = vit.patch_embed
    stem = isinstance(pe, HybridEmbed)
    if stem:
        images = pe.backbone(images)  # the stem's map: its cells are the pixels the kernel sees
    weight = pe.proj.weight
    base, kernel = pe.proj.kernel_size[0], patch // vit_stem_stride(vit)
    if kernel != base:
        weight = _resampler(base)(weight, [kernel, kernel])
    x = F.conv2d(images, weight, pe.proj.bias, stride=kernel)  # (B, D, H/p, W/p)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    if not stem:  # timm's HybridEmbed has no norm
        x = pe.norm(x)

    prefix = []
    if vit.cls_token is not None:
        prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))

    # Same order of operations as timm's `_pos_embed`, so the base setting is bit-identical.
    def with_prefix(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(prefix + [t], dim=1) if prefix else t

    if vit.pos_embed is None:
        return vit.pos_drop(with_prefix(x))
    pos = vit.pos_embed
    if tuple(grid) != tuple(pe.grid_size):
        pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(
            pos, new_size=list(grid), old_size=list(pe.grid_size), num_prefix_tokens=pos_prefix
        )
    x = with_prefix(x + pos) if vit.no_embed_class else with_prefix(x) + pos
    return vit.pos_drop(x)


def drop_tokens(tokens: torch.Tensor, keep: float, num_prefix: int) -> torch.Tensor:
    """Keep a random subset of round(keep * N) patch tokens per image (prefix tokens always kept).

    Args:
        tokens: (B, prefix + N, D).
    Returns:
        (B, prefix + round(keep * N), D).
    """
    patches = tokens.shape[1] - num_prefix
    kept = kept_patches(patches, keep)
    if kept == patches:
        return tokens
    # timm keeps int(N * (1 - prob)) tokens; this prob makes that exactly `kept`, free of float error.
    prob = 1.0 - (kept + 0.5) / patches
    out, _ = patch_dropout_forward(tokens, prob, num_prefix, ordered=False, training=True)
    return out


def forward_tokens(
    vit: VisionTransformer,
    images: torch.Tensor,
    setting: Setting | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Backbone forward under a compression setting.

    Args:
        images: (B, C, H, W); H and W divisible by the setting's patch size.
        setting: keep ratio, patch size and merge fraction (None: full input at the base patch).
        observe: called with each block's intermediate tensors (see `arch.run_blocks`).
    Returns:
        Normalized tokens (B, L, D): L = prefix + round(keep * H * W / patch**2) without merging,
        fewer with it (`merge.patch_tokens_per_block`).
    """
    setting = setting or Setting(1.0, base_patch_size(vit))
    x = embed_tokens(vit, images, setting.patch)
    alpha = options(vit).precondition_alpha
    if alpha is not None and alpha < 1:
        x = precondition_tokens(x, vit.num_prefix_tokens, alpha)
    x = drop_tokens(x, setting.keep, vit.num_prefix_tokens)
    x = vit.norm_pre(x)
    x = run_blocks(vit, x, setting.merge, observe)
    return vit.norm(x)


def forward_features(
    vit: VisionTransformer, images: torch.Tensor, setting: Setting | None = None
) -> torch.Tensor:
    """Pooled backbone features (B, D) under a compression setting (timm's pooling and fc_norm);
    compiled inside `compiled_features`."""
    mode = _compile_mode.get()
    if mode is not None:
        if setting is not None:
            _prewarm(vit, setting.patch)
        return _compiled(mode)(vit, images, setting)
    return _features(vit, images, setting)


def _features(vit: VisionTransformer, images: torch.Tensor, setting: Setting | None) -> torch.Tensor:
    return vit.forward_head(forward_tokens(vit, images, setting), pre_logits=True)


COMPILE_BACKEND = "inductor"  # tests compile with "aot_eager": the same graphs, no C++ build
_compile_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("compile_mode", default=None)


@functools.cache
def _compiled(mode: str):
    # Static shapes: one graph per (backbone, setting, batch size), the setting's fields are guards.
    # The schedule's bucketed settings (schedule.keep_buckets) bound their number; torch's cache
    # (on disk, inductor's FX graph cache) spares a resumed run the compile time.
    # dynamo falls back to eager after 8 graphs of one function; a curriculum's buckets take more
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(
        _features, mode=None if mode == "default" else mode, dynamic=False, backend=COMPILE_BACKEND
    )


@contextlib.contextmanager
def compiled_features(mode: str) -> Iterator[None]:
    """`forward_features` compiled in `mode` (train.compile) within the block; "no": as it is.
    The training step alone runs in it: evaluation's batches of other sizes stay eager."""
    token = _compile_mode.set(None if mode == "no" else mode)
    try:
        yield
    finally:
        _compile_mode.reset(token)
