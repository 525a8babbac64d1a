"""Gradient reversal: identity in the forward pass, −λ·grad in the backward pass (Ganin et al. 2016).

Used by DANN (features → discriminator) and by AdvStyle (an optimiser *descending* on the reversed
gradient of the adversary's parameters performs *ascent* on the task loss).
"""

from __future__ import annotations

import torch
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """x unchanged; its gradient is multiplied by −coeff on the way back."""
    return _GradReverse.apply(x, float(coeff))


class GradientReversal(nn.Module):
    """Module form of `grad_reverse`; `coeff` may be changed between steps (DANN's λ_p schedule)."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"
