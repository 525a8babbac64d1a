"""Backbones by name. `build_backbone("resnet50", in_channels=6)`; see BACKBONES for the names."""

from __future__ import annotations

from collections.abc import Callable

from ..base import MethodError
from .base import INSERTION_POINTS, Backbone
from .resnet import resnet18, resnet34, resnet50, resnet_tiny

BACKBONES: dict[str, Callable[[int], Backbone]] = {
    "resnet-tiny": resnet_tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_backbone(spec: str, in_channels: int) -> Backbone:
    if spec in BACKBONES:
        return BACKBONES[spec](in_channels)
    raise MethodError(f"unknown backbone {spec!r}; known: {', '.join(sorted(BACKBONES))}")


__all__ = ["BACKBONES", "INSERTION_POINTS", "Backbone", "build_backbone"]
