"""Learning-rate factor per step: linear warm-up over `warmup_epochs`, then cosine to zero or constant."""

from __future__ import annotations

import math


def lr_factor(epoch: int, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, schedule: str) -> float:
    total = max(1, epochs * steps_per_epoch)
    t = epoch * steps_per_epoch + step
    warm = warmup_epochs * steps_per_epoch
    if warm and t < warm:
        return (t + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = (t - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
