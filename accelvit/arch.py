"""Architecture options for studies, applied to a timm ViT without changing its modules.

- `model.value_residual` (ResFormer, "Value residual learning", Zhou et al. 2024): every block after
  the first mixes its attention values with the first block's, V'_n = l1 * V_n + l2 * V_1, with
  per-block scalars (`vit.value_lambdas`, (depth, 2)) learnable from 0.5 / 0.5, or fixed by
  `model.value_lambdas`. With l1 = 1, l2 = 0 the model is the plain timm ViT, bit for bit. Token
  dropout happens before the first block, so V_1 always holds the tokens each block sees.
- `model.attn_skip: false` removes the skip connection around self-attention (x = attn(norm(x)),
  then the MLP with its skip), the ablation under which self-attention is ill-conditioned.
- `model.token_precondition: svd`: each image's patch-token matrix X = U diag(s) V^T (after the
  position embedding, prefix tokens excluded) becomes U diag(s_i^a * s_max^(1-a)) V^T with
  a = `model.precondition_alpha` in (0, 1] (1: unchanged). Its condition number becomes cond(X)^a,
  in the spirit of Token Graying. Cost: one thin SVD of an (N, D) matrix per image and step, about
  4 N D min(N, D) FLOPs, small against the blocks but not free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from accelvit.config import ModelConfig


@dataclass(frozen=True)
class ArchOptions:
    value_residual: bool = False
    attn_skip: bool = True
    precondition_alpha: float | None = None  # None: no preconditioning

    @property
    def plain(self) -> bool:
        return not self.value_residual and self.attn_skip


def attach(vit: VisionTransformer, cfg: ModelConfig) -> VisionTransformer:
    """Record the options of `cfg` on `vit` and add the value-residual scalars they need."""
    alpha = cfg.precondition_alpha if cfg.token_precondition == "svd" else None
    vit.accelvit_options = ArchOptions(cfg.value_residual, cfg.attn_skip, alpha)
    if cfg.value_residual:
        lambdas = torch.tensor(cfg.value_lambdas or [0.5, 0.5]).repeat(len(vit.blocks), 1)
        if cfg.value_lambdas is None:
            vit.value_lambdas = nn.Parameter(lambdas)
        else:
            vit.register_buffer("value_lambdas", lambdas)
    return vit


def options(vit: VisionTransformer) -> ArchOptions:
    return getattr(vit, "accelvit_options", ArchOptions())


def run_blocks(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The blocks of `vit` on tokens (B, L, D): timm's own forward unless an option changes it."""
    opts = options(vit)
    if opts.plain:
        return vit.blocks(x)
    v1 = None
    for i, block in enumerate(vit.blocks):
        lambdas = vit.value_lambdas[i] if opts.value_residual else None
        x, v = block_forward(block, x, v1, lambdas, opts.attn_skip)
        v1 = v if v1 is None else v1
    return x


def block_forward(
    block: Block, x: torch.Tensor, v1: torch.Tensor | None, lambdas: torch.Tensor | None, skip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Block forward with the value residual and the optional attention skip.

    Returns the block output and this block's values V (B, heads, L, head_dim).
    """
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise ValueError("gated attention is not supported by model.value_residual / model.attn_skip")
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mixed = v if v1 is None or lambdas is None else lambdas[0] * v + lambdas[1] * v1
    out = F.scaled_dot_product_attention(q, k, mixed, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, -1))))
    out = block.drop_path1(block.ls1(out))
    x = x + out if skip else out
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, v


def precondition_tokens(tokens: torch.Tensor, num_prefix: int, alpha: float) -> torch.Tensor:
    """Spectral preconditioning of each image's patch tokens (B, prefix + N, D); prefix kept."""
    prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    s_max = s[:, :1]
    s_new = s.clamp_min(1e-12) ** alpha * s_max ** (1 - alpha)
    x = (u * s_new[:, None, :]) @ vh
    return torch.cat([prefix, x.to(tokens.dtype)], dim=1)


def extra_parameters(vit: VisionTransformer) -> list[str]:
    """State-dict keys the options add to a timm ViT (listed in exports)."""
    return ["value_lambdas"] if options(vit).value_residual else []
