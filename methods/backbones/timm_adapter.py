"""`timm:<name>` backbones: any timm model as a featurizer, when the optional package timm is installed.

timm is not a platebench dependency; the spec fails with a clear message without it. The model is
created with `num_classes=0` (pooled features) and `in_chans=C`, without downloading weights (workers
may have no network; load weights with timm's own tools if needed). Insertion points are mapped onto
the model's `feature_info` stages when it lists exactly five (stem, res1..res4, e.g. timm ResNets);
otherwise `set_insert` refuses, naming the model.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import MethodError
from .base import INSERTION_POINTS, Backbone


class TimmBackbone(Backbone):
    def __init__(self, model_name: str, in_channels: int):
        super().__init__()
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise MethodError(f"backbone 'timm:{model_name}' needs the optional package timm (pip install timm); "
                              f"platebench does not depend on it") from None
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels)
        self.out_dim = int(self.model.num_features)
        stages = [info["module"] for info in getattr(self.model, "feature_info", None) or []]
        self.points = dict(zip(INSERTION_POINTS, stages)) if len(stages) == len(INSERTION_POINTS) else {}
        for point, module_name in self.points.items():
            self.model.get_submodule(module_name).register_forward_hook(self._hook(point))

    def _hook(self, point: str):
        def apply_insert(module: nn.Module, inputs, output):
            return self.inserts[point](output) if point in self.inserts else output

        return apply_insert

    def set_insert(self, point: str, module: nn.Module | None) -> None:
        if module is not None and point not in self.points:
            raise MethodError(f"timm model {self.model_name!r} has no insertion point {point!r} "
                              f"(available: {sorted(self.points) or 'none: feature_info does not list 5 stages'})")
        super().set_insert(point, module)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # timm pools (and handles token outputs) itself when num_classes=0


def timm_backbone(model_name: str, in_channels: int) -> TimmBackbone:
    return TimmBackbone(model_name, in_channels)
