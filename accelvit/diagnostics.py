"""Attention diagnostics of a ViT on a fixed probe batch at full input.

Per block:
- `entropy`: the entropy of the attention distributions, averaged over heads and queries and
  divided by log N (N: sequence length), so 1 is uniform attention and 0 attention on one token.
  Training typically shows "scan then snap": broad attention early that snaps onto few tokens.
- `attn_cond`, `block_cond`: the condition number (largest over smallest singular value, in
  float64) of the self-attention output and of the block output, as (N, D) token matrices, median
  over the probe images. Self-attention without its skip connection is ill-conditioned ("Always
  skip attention", 2025); these numbers show how far a model is from that.
- `input_cond`: the same for the patch tokens entering the first block (lowered by
  `model.token_precondition: svd`).

The blocks run accelvit's forward (`arch.run_blocks`) with an observer, so every architecture
option is measured the same way.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer

from accelvit.compress import forward_tokens
from accelvit.evaluate import eval_transform


def attention_entropy(probs: torch.Tensor) -> float:
    """Mean entropy of attention rows `probs` (B, H, N, N), divided by log N."""
    n = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return float(entropy.mean() / math.log(n)) if n > 1 else 0.0


def condition_numbers(tokens: torch.Tensor) -> torch.Tensor:
    """Condition number of each (N, D) token matrix of `tokens` (B, N, D), in float64."""
    s = torch.linalg.svdvals(tokens.double())
    return s[:, 0] / s[:, -1].clamp_min(1e-300)


@torch.no_grad()
def measure_blocks(vit: VisionTransformer, images: torch.Tensor) -> list[dict]:
    """Per block: attention entropy and condition numbers of attention and block outputs."""
    captured: list[dict] = [{} for _ in vit.blocks]

    def observe(i: int, t: dict[str, torch.Tensor]) -> None:
        probs = (t["q"] * vit.blocks[i].attn.scale @ t["k"].transpose(-2, -1)).softmax(dim=-1)
        captured[i]["entropy"] = attention_entropy(probs.float())
        captured[i]["attn_cond"] = float(condition_numbers(t["attn"]).median())
        captured[i]["block_cond"] = float(condition_numbers(t["block"]).median())

    inputs: dict = {}

    def on_input(module, args):  # the tokens entering the first block (after any preconditioning)
        inputs["input_cond"] = float(condition_numbers(args[0][:, vit.num_prefix_tokens :]).median())

    hook = vit.norm_pre.register_forward_pre_hook(on_input)
    was_training = vit.training
    vit.eval()
    try:
        forward_tokens(vit, images, observe=observe)
    finally:
        vit.train(was_training)
        hook.remove()
    return [{"block": i, **inputs, **values} for i, values in enumerate(captured)]


def probe_batch(images, image_size: int, count: int = 32) -> torch.Tensor:
    """The first `count` images of a dataset at full input (resized, normalised): the fixed probe."""
    transform = eval_transform(image_size)
    return torch.stack([transform(images[i][0]) for i in range(min(count, len(images)))])
