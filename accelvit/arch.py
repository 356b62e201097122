"""Architecture options for studies, applied to a timm ViT without changing its modules.

- `model.value_residual` (ResFormer, "Value residual learning", Zhou et al. 2024): every block after
  the first mixes its attention values with the first block's, V'_n = l1 * V_n + l2 * V_1, with
  per-block scalars (`vit.value_lambdas`, (depth, 2)) learnable from 0.5 / 0.5, or fixed by
  `model.value_lambdas`. With l1 = 1, l2 = 0 the model is the plain timm ViT, bit for bit. Token
  dropout happens before the first block, and token merging (`accelvit.merge`) merges V_1 with the
  tokens, so V_1 always lines up with the tokens each block sees.
- `model.attn_skip: false` removes the skip connection around self-attention (x = attn(norm(x)),
  then the MLP with its skip), the ablation under which self-attention is ill-conditioned.
- `model.token_precondition: svd`: each image's patch-token matrix X = U diag(s) V^T (after the
  position embedding, prefix tokens excluded) becomes U diag(s_i^a * s_max^(1-a)) V^T with
  a = `model.precondition_alpha` in (0, 1] (1: unchanged). Its condition number becomes cond(X)^a,
  in the spirit of Token Graying. Cost: one thin SVD of an (N, D) matrix per image and step, about
  4 N D min(N, D) FLOPs, small against the blocks but not free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from accelvit.config import ModelConfig
from accelvit.merge import bipartite_soft_matching, merge_weighted, merged_per_block


@dataclass(frozen=True)
class ArchOptions:
    value_residual: bool = False
    attn_skip: bool = True
    precondition_alpha: float | None = None  # None: no preconditioning

    @property
    def plain(self) -> bool:
        return not self.value_residual and self.attn_skip


EXTRA_PARAMETERS = ("value_lambdas",)  # state-dict keys the options can add to a timm ViT (exports list them)


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


Observer = Callable[[int, dict[str, torch.Tensor]], None]


def run_blocks(
    vit: VisionTransformer, x: torch.Tensor, merge: float = 0.0, observe: Observer | None = None
) -> torch.Tensor:
    """The blocks of `vit` on tokens (B, L, D), with token merging at fraction `merge` per block.

    timm's own forward unless an option, merging or an observer needs accelvit's. `observe(i, t)`
    receives block i's queries and keys (B, heads, L, head_dim), its attention output and its output.
    """
    opts = options(vit)
    if opts.plain and merge == 0 and observe is None:
        return vit.blocks(x)
    prefix = vit.num_prefix_tokens
    v1 = size = None  # the first block's values; patches per token (None: all ones)
    for i, block in enumerate(vit.blocks):
        lambdas = vit.value_lambdas[i] if opts.value_residual else None
        attn_out, q, k, v = attention(block.attn, block.norm1(x), v1, lambdas, size)
        out = block.drop_path1(block.ls1(attn_out))
        x = x + out if opts.attn_skip else out
        if opts.value_residual and v1 is None:
            v1 = v
        r = merged_per_block(x.shape[1] - prefix, merge)
        if r > 0:
            matching = bipartite_soft_matching(k.mean(1), r, prefix)
            if size is None:
                size = x.new_ones(x.shape[:2], dtype=torch.float32)
            # V_1 is merged like the tokens, so every block mixes values of the tokens it sees
            carried = [x, v1.transpose(1, 2)] if opts.value_residual else [x]
            carried, size = merge_weighted(matching, carried, size)
            x = carried[0]
            v1 = carried[1].transpose(1, 2) if opts.value_residual else v1
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        if observe is not None:
            observe(i, {"q": q, "k": k, "attn": attn_out, "block": x})
    return x


def attention(
    attn: Attention,
    h: torch.Tensor,
    v1: torch.Tensor | None,
    lambdas: torch.Tensor | None,
    size: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """timm's Attention forward on normed tokens `h` (B, L, D) with the value residual and ToMe's
    proportional attention (log of the token sizes `size` (B, L) added to the logits).

    Returns the attention output (B, L, D) and this block's q, k, v (B, heads, L, head_dim).
    """
    if getattr(attn, "gate", None) is not None:
        raise ValueError("gated attention is not supported by model options or token merging")
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mixed = v if v1 is None or lambdas is None else lambdas[0] * v + lambdas[1] * v1
    mask = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, mixed, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, -1))))
    return out, q, k, v


def precondition_tokens(tokens: torch.Tensor, num_prefix: int, alpha: float) -> torch.Tensor:
    """Spectral preconditioning of each image's patch tokens (B, prefix + N, D); prefix kept."""
    prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    s_max = s[:, :1]
    s_new = s.clamp_min(1e-12) ** alpha * s_max ** (1 - alpha)
    x = (u * s_new[:, None, :]) @ vh
    return torch.cat([prefix, x.to(tokens.dtype)], dim=1)
