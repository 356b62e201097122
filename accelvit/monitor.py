"""Collapse monitors: numbers that tell a learning run from a collapsed one, logged at each log line.

- `feature_std`: lightly's `std_of_l2_normalized` of the backbone features (Chen and He, SimSiam,
  CVPR 2021): about 1/sqrt(d) for features spread over the sphere, 0 when every image maps to one point.
- DINO only (Caron et al., ICCV 2021, section 5.3): `teacher_entropy`, the mean entropy of the
  centred, sharpened teacher distribution over ln K (1: uniform collapse), and `prototypes_used`,
  how many of the K prototypes are some image's most likely one in the batch (1: one dominates).
"""

from __future__ import annotations

import math

import torch

HEALTHY_FRACTION = 0.1  # feature_std below this fraction of 1/sqrt(d) reads as collapsed


@torch.no_grad()
def feature_monitors(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """`feature_std` of backbone features (B, D)."""
    from lightly.utils.debug import std_of_l2_normalized  # its module imports matplotlib: not at start-up

    return {"feature_std": std_of_l2_normalized(features.detach().float())}


@torch.no_grad()
def teacher_monitors(teacher: torch.Tensor, center: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
    """`teacher_entropy` (over ln K) and `prototypes_used` of teacher logits (N, K).

    The distribution is the one the loss uses: softmax((teacher - center) / temp).
    """
    logits = (teacher.detach().float() - center.reshape(1, -1)) / temp
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean() / math.log(teacher.shape[-1])
    used = torch.tensor(float(logits.argmax(-1).unique().numel()), device=teacher.device)
    return {"teacher_entropy": entropy, "prototypes_used": used}


def collapse_warning(record: dict, feature_dim: int) -> str | None:
    """One line naming the monitor that reads as collapsed in a metrics record, or None."""
    healthy = 1 / math.sqrt(feature_dim)
    std = record.get("feature_std")
    if std is not None and std < HEALTHY_FRACTION * healthy:
        return (
            f"step {record['step']}: the run looks collapsed: feature_std {std:.4f} "
            f"(healthy about 1/sqrt({feature_dim}) = {healthy:.4f}, 0 when collapsed)"
        )
    if record.get("prototypes_used") is not None and record["prototypes_used"] <= 1:
        return f"step {record['step']}: the run looks collapsed: one DINO prototype takes every image"
    if record.get("teacher_entropy") is not None and record["teacher_entropy"] > 0.99:
        return (
            f"step {record['step']}: the run looks collapsed: teacher entropy "
            f"{record['teacher_entropy']:.3f} of ln K (uniform teacher output)"
        )
    return None
