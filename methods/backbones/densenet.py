"""In-house DenseNets with torchvision's parameter names (features.conv0, features.denseblockK.denselayerJ.norm1,
features.transitionK, features.norm5), so torchvision state dicts load (see weights.py).

The first convolution takes any number of channels. There is no `classifier`: heads belong to
methods. Insertion points: stem (after pool0), resK (after dense block K and its transition; res4
after norm5 + ReLU, i.e. the map torchvision pools).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv producing `growth` new channels."""

    def __init__(self, in_features: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n_layers: int, in_features: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(n_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_features + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(OrderedDict([("norm", nn.BatchNorm2d(in_features)), ("relu", nn.ReLU(inplace=True)),
                                      ("conv", nn.Conv2d(in_features, out_features, 1, bias=False)),
                                      ("pool", nn.AvgPool2d(2, 2))]))


class DenseNet(Backbone):
    def __init__(self, growth: int, block_config: tuple[int, ...], init_features: int, in_channels: int,
                 bn_size: int = 4):
        super().__init__()
        if len(block_config) != 4:
            raise ValueError(f"DenseNet needs 4 dense blocks (one per insertion point), got {block_config}")
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        n = init_features
        for i, n_layers in enumerate(block_config, start=1):
            self.features.add_module(f"denseblock{i}", DenseBlock(n_layers, n, growth, bn_size))
            n += n_layers * growth
            if i < len(block_config):
                self.features.add_module(f"transition{i}", Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.out_dim = n
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _run(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = getattr(self.features, name)(x) if name != "relu5" else F.relu(x)
        return x

    def stages(self):
        groups = {
            "stem": ("conv0", "norm0", "relu0", "pool0"),
            "res1": ("denseblock1", "transition1"),
            "res2": ("denseblock2", "transition2"),
            "res3": ("denseblock3", "transition3"),
            "res4": ("denseblock4", "norm5", "relu5"),  # torchvision applies ReLU after norm5 before pooling
        }
        return [(point, lambda x, names=names: self._run(names, x)) for point, names in groups.items()]


def densenet121(in_channels: int) -> DenseNet:
    return DenseNet(32, (6, 12, 24, 16), 64, in_channels)


def densenet161(in_channels: int) -> DenseNet:
    return DenseNet(48, (6, 12, 36, 24), 96, in_channels)
