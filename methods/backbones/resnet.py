"""In-house ResNets with torchvision's parameter names (conv1, bn1, layer1..4, downsample.0/1).

The first convolution takes any number of channels (6 RxRx1, 3 RxRx1-WILDS, 5 JUMP-CP). There is
no `fc`: heads belong to methods. `resnet-tiny` is a small ResNet for CPU runs on 32-64 px images.
"""

from __future__ import annotations

from torch import nn

from .base import Backbone


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (torchvision v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    def __init__(self, block, layers, in_channels: int, widths=(64, 128, 256, 512), small_input: bool = False):
        super().__init__()
        self.inplanes = widths[0]
        if small_input:  # 3x3 stride-1 stem and no max-pool: keeps resolution on 32-64 px images
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.out_dim = widths[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self):
        return [("stem", self._stem), ("res1", self.layer1), ("res2", self.layer2), ("res3", self.layer3),
                ("res4", self.layer4)]


def resnet_tiny(in_channels: int) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], in_channels, widths=(16, 32, 64, 128), small_input=True)


def resnet18(in_channels: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels)


def resnet34(in_channels: int) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels)


def resnet50(in_channels: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels)
