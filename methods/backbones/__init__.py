"""Backbones by name. `build_backbone("resnet50", in_channels=6)`; see BACKBONES for the names.
`build_backbone(spec, C, weights=URI)` starts from a safetensors file's weights (weights.py).

A spec is either a name in BACKBONES or "<prefix>:<rest>" resolved by BACKBONE_PREFIXES
(e.g. "timm:convnext_tiny", available when the optional package timm is installed).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import MethodError
from .base import DEFAULT_BACKBONE, INSERTION_POINTS, Backbone
from .densenet import densenet121, densenet161
from .resnet import resnet18, resnet34, resnet50, resnet_tiny
from .timm_adapter import timm_backbone
from .vit import vit_small, vit_tiny
from .weights import load_pretrained_state_dict, load_weights

BACKBONES: dict[str, Callable[[int], Backbone]] = {
    DEFAULT_BACKBONE: resnet_tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "densenet161": densenet161,
    "vit-small": vit_small,
    "vit-tiny": vit_tiny,
}

# "<prefix>:<rest>" specs: the factory receives <rest> and the number of input channels.
BACKBONE_PREFIXES: dict[str, Callable[[str, int], Backbone]] = {
    "timm": timm_backbone,
}


def build_backbone(spec: str, in_channels: int, weights: str = "") -> Backbone:
    """The backbone `spec` for `in_channels` input channels; `weights`: a safetensors file's URI ("" = random)."""
    backbone = _architecture(spec, in_channels)
    if weights:
        load_weights(backbone, weights, spec)
    return backbone


def _architecture(spec: str, in_channels: int) -> Backbone:
    if spec in BACKBONES:
        return BACKBONES[spec](in_channels)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in BACKBONE_PREFIXES and rest:
        return BACKBONE_PREFIXES[prefix](rest, in_channels)
    prefixes = ", ".join(f"{p}:<name>" for p in sorted(BACKBONE_PREFIXES))
    raise MethodError(f"unknown backbone {spec!r}; known: {', '.join(sorted(BACKBONES))}, or {prefixes}")


__all__ = ["BACKBONES", "BACKBONE_PREFIXES", "INSERTION_POINTS", "Backbone", "build_backbone",
           "load_pretrained_state_dict"]
