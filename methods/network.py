"""Featurizer + classifier head shared by the methods, and the loss helpers they all use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone


class Network(nn.Module):
    """`featurizer` (a Backbone with insertion points) followed by a linear `classifier`."""

    def __init__(self, backbone: str, channels: int, num_classes: int, weights: str = ""):
        super().__init__()
        self.featurizer = build_backbone(backbone, channels, weights)
        self.classifier = nn.Linear(self.featurizer.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.featurizer(x)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE over rows where `mask` is set (rows without a class or control context are excluded)."""
    if not bool(mask.any()):
        # No labelled row: a zero that still depends on the graph keeps every rank's backward identical.
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], labels[mask])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(1) == labels).float().mean())
