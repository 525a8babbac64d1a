"""Cosine classifier head and the ArcFace additive-angular-margin loss (Deng et al., CVPR 2019).

cos θ_k = ŵ_k·ẑ (unit-normalised rows of W and features). ArcFace replaces the target logit
s·cos θ_y by s·cos(θ_y + m) and applies cross-entropy. The target term is computed in the
numerically safe form cos θ cos m − sin θ sin m, with sin θ = √clamp(1 − cos²θ, SIN2_FLOOR, 1):
the floor keeps the gradient finite at cos θ = ±1 (a floor of 0 gives inf·0 = NaN there). Where
θ_y + m would pass π the loss switches to the monotone fallback cos θ_y − m·sin m, so the target
logit keeps falling as m grows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import full_precision

SIN2_FLOOR = 1e-7  # lower clamp of sin²θ; makes d/dcosθ finite at cosθ = ±1


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos θ [B, K] between rows of `features` [B, D] and class weights `weight` [K, D]."""
    return F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))


class CosineHead(nn.Module):
    """Linear head without bias whose output is cos θ (multiply by a scale s for logits)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)


def margin_target_cos(cos_target: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(θ + m) for target cosines, safe at cos θ = ±1, with the fallback past θ + m = π."""
    if margin < 0:
        raise ValueError(f"ArcFace margin must be >= 0, got {margin!r}")
    cos_t = cos_target.clamp(-1.0, 1.0)
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp(SIN2_FLOOR, 1.0))
    shifted = cos_t * math.cos(margin) - sin_t * math.sin(margin)
    fallback = cos_t - margin * math.sin(margin)
    # θ + m > π  ⇔  cos θ < cos(π − m); with m = 0 the threshold is −1 and the fallback never fires.
    return torch.where(cos_t < math.cos(math.pi - margin), fallback, shifted)


@full_precision  # InsightFace casts the cosine logits to float before the margin
def arcface_logits(cos: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """s·cos θ with the target column replaced by s·cos(θ_y + m). `labels` must be valid class ids."""
    target = cos.gather(1, labels[:, None])
    one_hot = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], True)
    return scale * torch.where(one_hot, margin_target_cos(target, margin), cos)


def arcface_loss(cos: torch.Tensor, labels: torch.Tensor, margin: float, scale: float,
                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on ArcFace logits (reduction "mean" | "none")."""
    return F.cross_entropy(arcface_logits(cos, labels, margin, scale), labels, reduction=reduction)
