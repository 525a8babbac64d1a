"""Backbone interface: a featurizer with named insertion points for feature-statistics modules.

`feature_map(x)` runs the stem and the four stages; after each point named in INSERTION_POINTS
("stem", "res1".."res4") it applies the module set there with `set_insert` (identity by default).
`forward(x)` = global-average-pooled `feature_map(x)` of size `out_dim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# The backbone of every command, suite and method when none is named: small enough for CPU runs at 24-64 px.
DEFAULT_BACKBONE = "resnet-tiny"

INSERTION_POINTS = ("stem", "res1", "res2", "res3", "res4")


class Backbone(nn.Module):
    out_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.inserts = nn.ModuleDict()

    def set_insert(self, point: str, module: nn.Module | None) -> None:
        if point not in INSERTION_POINTS:
            raise ValueError(f"unknown insertion point {point!r}; known: {INSERTION_POINTS}")
        if module is None:
            if point in self.inserts:  # ModuleDict.pop takes no default
                del self.inserts[point]
        else:
            self.inserts[point] = module

    def stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """(insertion point, callable) in order; subclasses define their stem and four stages."""
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        for point, stage in self.stages():
            x = stage(x)
            if point in self.inserts:
                x = self.inserts[point](x)
        return x

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))
