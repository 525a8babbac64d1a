"""Jensen–Shannon divergence between predictive distributions (Lin 1991; JS(p, q) = ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2).

JS(p, q) = ½KL(p‖r) + ½KL(q‖r), r = (p + q)/2, natural log, per sample, then averaged. Probabilities
are clamped at PROB_FLOOR inside the logs only, so a zero entry contributes exactly 0 (0·log 0 = 0)
and JS stays ≤ ln 2; JS(p, p) is exactly 0 because (p + p)/2 == p in floating point.
"""

from __future__ import annotations

import torch

from ..precision import full_precision

PROB_FLOOR = 1e-7


def _kl_to(p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    return (p * (p.clamp_min(PROB_FLOOR).log() - log_r)).sum(dim=1)


@full_precision
def js_divergence(p: torch.Tensor, q: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """JS between rows of probability tensors p, q [B, K]; reduction "mean" | "none"."""
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    log_r = (0.5 * (p + q)).clamp_min(PROB_FLOOR).log()
    per_sample = 0.5 * _kl_to(p, log_r) + 0.5 * _kl_to(q, log_r)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean() if per_sample.numel() else per_sample.sum()
    raise ValueError(f"js_divergence: reduction must be 'mean' or 'none', got {reduction!r}")


@full_precision  # softmax and logs of the consistency term in float32
def js_divergence_logits(logits_a: torch.Tensor, logits_b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """JS between softmax(logits_a) and softmax(logits_b) (the consistency term of ABRA)."""
    return js_divergence(logits_a.softmax(dim=1), logits_b.softmax(dim=1), reduction)
