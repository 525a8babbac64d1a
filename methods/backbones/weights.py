"""Loading torchvision ResNet/DenseNet weights into our backbones (same parameter names).

`load_torchvision_state_dict(backbone, state_dict)` ignores the classification head (fc. /
classifier.), renames the legacy DenseNet keys of torchvision's hosted files ("norm.1.weight" ->
"norm1.weight", as torchvision itself does when loading them), and adapts a 3-channel first
convolution to C input channels: the RGB filters are averaged, repeated C times and scaled by 3/C,
so a constant image (equal in every channel) gets the same response as in the RGB model.
Anything else that does not match (missing or unexpected keys, shapes) is an error listing the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import MethodError

HEAD_PREFIXES = ("fc.", "classifier.")
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                              r"running_var|num_batches_tracked))$")
_OPTIONAL_SUFFIX = "num_batches_tracked"  # absent from old torchvision files; harmless to keep ours
_SHOW = 10


def first_conv_name(backbone: nn.Module) -> str:
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise MethodError(f"{type(backbone).__name__} has no Conv2d layer")


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """[out, 3, k, k] RGB filters -> [out, C, k, k]: channel mean repeated C times, scaled by 3/C."""
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def _rename(key: str) -> str:
    if key.startswith("module."):  # saved from DataParallel / DDP
        key = key[len("module."):]
    match = _LEGACY_DENSENET.match(key)
    return match.group(1) + match.group(2) if match else key


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_torchvision_state_dict(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision-layout state dict into `backbone` (in place); see the module docstring."""
    ours = {k: v for k, v in backbone.state_dict().items() if not k.startswith("inserts.")}
    incoming = {_rename(k): v for k, v in state_dict.items()}
    incoming = {k: v for k, v in incoming.items() if not k.startswith(HEAD_PREFIXES)}
    conv = first_conv_name(backbone)
    if conv in incoming and incoming[conv].dim() == 4:
        have, want = incoming[conv].shape[1], ours[conv].shape[1]
        if have != want:
            if have != 3:
                raise MethodError(f"first conv {conv!r}: checkpoint has {have} input channels, backbone {want}; "
                                  f"only 3-channel (RGB) filters are adapted")
            incoming[conv] = adapt_first_conv(incoming[conv], want)
    missing = [k for k in ours if k not in incoming and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in incoming if k not in ours]
    shapes = [f"{k} {tuple(incoming[k].shape)} vs ours {tuple(ours[k].shape)}"
              for k in ours if k in incoming and incoming[k].shape != ours[k].shape]
    problems = [f"{label} ({len(keys)}): {_listing(keys)}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
    if problems:
        raise MethodError(f"state dict does not fit {type(backbone).__name__}: " + "; ".join(problems))
    backbone.load_state_dict(incoming, strict=False)  # only optional num_batches_tracked may be absent
