"""Token merging (ToMe, Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Inside each block, between attention and MLP, the patch tokens are split alternately into sets A
(even positions) and B (odd positions); each A token is matched to its most similar B token by cosine
similarity of the attention keys (averaged over heads), and the r best-matched A tokens are merged
into their B partners by a size-weighted average. Each token carries its size (how many patches it
stands for); attention adds log(size) to its logits (proportional attention), so a merged token
weighs as much as the tokens it replaced. Prefix (class, register) tokens are never merged.

`schedule.merge` is the fraction m of a block's patch tokens merged away in that block:
r = min(round(m * n), n // 2) for n patch tokens entering it. So the sequence shrinks geometrically,
about (1 - m) per block. Neither timm nor lightly implements ToMe, and the reference code is not a
package, hence this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def merged_per_block(patches: int, merge: float) -> int:
    """Patch tokens one block removes when `patches` enter it: min(round(m * n), n // 2)."""
    return min(round(merge * patches), patches // 2)


def patch_tokens_per_block(patches: int, merge: float, depth: int) -> list[int]:
    """Patch tokens entering each block's attention, then the count leaving the last block.

    Returns depth + 1 counts; block i runs attention on counts[i] and its MLP on counts[i + 1].
    """
    counts = [patches]
    for _ in range(depth):
        counts.append(counts[-1] - merged_per_block(counts[-1], merge))
    return counts


Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Merge:
    """The matching of ToMe on `metric` (B, L, C), prefix tokens excluded from merging.

    Returns `merge(x)` that sums the r matched A tokens into their B partners for any x (B, L, ...),
    giving (B, L - r, ...): prefix tokens, unmerged A tokens in their order, then the B tokens.
    """
    with torch.no_grad():  # the matching is a discrete choice: no gradient flows through it
        metric = F.normalize(metric[:, num_prefix:], dim=-1)  # eps: a zero key matches nothing, no NaN
        a, b = metric[:, ::2], metric[:, 1::2]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        unm_idx = order[:, r:].sort(dim=-1).values  # keep the surviving A tokens in sequence order
        src_idx = order[:, :r]
        dst_idx = node_idx.gather(-1, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        src, dst = patches[:, ::2], patches[:, 1::2]
        tail = x.shape[2:]

        def index(idx: torch.Tensor) -> torch.Tensor:
            return idx.view(*idx.shape, *(1,) * len(tail)).expand(*idx.shape, *tail)

        unm = src.gather(1, index(unm_idx))
        dst = dst.scatter_add(1, index(dst_idx), src.gather(1, index(src_idx)))
        return torch.cat([prefix, unm, dst], dim=1)

    return merge


def merge_weighted(
    merge: Merge, tensors: list[torch.Tensor], size: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Size-weighted averages of `tensors` (each (B, L, ...)) under one matching, and the new sizes.

    Args:
        size: (B, L) patches each token stands for.
    Returns:
        The merged tensors (B, L - r, ...) and the merged sizes (B, L - r).
    """
    new_size = merge(size)

    def weights(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return s.view(*s.shape, *(1,) * (x.dim() - 2)).to(x.dtype)

    return [merge(x * weights(size, x)) / weights(new_size, x) for x in tensors], new_size
