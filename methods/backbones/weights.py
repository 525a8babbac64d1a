"""Pretrained weights for our backbones: safetensors files by URI, and torchvision/timm-layout state dicts.

`weights=URI` (a common hyperparameter; a local path, file:// or s3:// URL, opened as datasets/storage.py
opens every URL) names a safetensors file; `load_weights(backbone, uri, spec)` reads it and loads it with
`load_pretrained_state_dict`. Any other file (a pickle, a torch `.pt`) is refused with one line naming it:
only the safetensors header (8 bytes of length, then JSON) and raw tensor bytes are ever parsed, so a file
in a shared bucket is data, never code. `encode_weights` writes the files (`platebench export-weights`),
with the backbone spec and channel count in the file's metadata; a file whose metadata names another
backbone than the one it is loaded into is refused.

`load_pretrained_state_dict(backbone, state_dict)` takes our backbones' own parameter names (torchvision's for
the ResNets and DenseNets, timm's for the ViTs), ignores the classification head (fc. / classifier. / head.),
renames the legacy DenseNet keys of torchvision's hosted files ("norm.1.weight" -> "norm1.weight", as
torchvision itself does when loading them), and adapts a 3-channel first convolution (a ViT's
patch_embed.proj) to C input channels: the RGB filters are averaged, repeated C times and scaled by 3/C, so
a constant image (equal in every channel) gets the same response as in the RGB model. Anything else that
does not match (missing or unexpected keys, shapes) is an error listing the keys.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping

import torch
from platebench.datasets.storage import filesystem, with_retries
from torch import nn

from ..errors import MethodError

HEAD_PREFIXES = ("fc.", "classifier.", "head.")
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


def load_pretrained_state_dict(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision/timm-layout state dict into `backbone` (in place); see the module docstring."""
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


# ---- safetensors files -------------------------------------------------------------------------------
META_BACKBONE = "platebench.backbone"  # the backbone spec the tensors were exported from
META_CHANNELS = "platebench.in_channels"
_MAX_HEADER = 100_000_000  # bytes: the safetensors format's own limit on the JSON header


def _header(uri: str, head: bytes, size: int) -> dict:
    """The JSON header of a safetensors file from its first bytes (`size`: the file's length); an error naming
    the file when it is not one. Never parses anything but this length-prefixed JSON."""
    refuse = MethodError(f"weights {uri!r}: not a safetensors file (platebench loads weights only from "
                         f"safetensors, never a pickle or torch .pt file; convert it with safetensors.torch.save_file)")
    if len(head) < 8:
        raise refuse
    (length,) = struct.unpack("<Q", head[:8])
    if length > min(_MAX_HEADER, size - 8) or len(head) < 8 + length:
        raise refuse
    try:
        header = json.loads(head[8:8 + length])
    except ValueError:
        raise refuse from None
    if not isinstance(header, dict):
        raise refuse
    return header


def _check_backbone(uri: str, metadata: Mapping[str, str], spec: str) -> None:
    exported_from = metadata.get(META_BACKBONE)
    if exported_from and exported_from != spec:
        raise MethodError(f"weights {uri!r} hold a {exported_from!r} backbone, not {spec!r}")


def check_weights_file(uri: str, spec: str) -> None:
    """Refuse, reading only its header, a file that is not safetensors or whose metadata names another backbone
    than `spec`: the harness's check before a run starts."""
    fs, path = filesystem(uri)

    def read() -> tuple[bytes, int]:
        size = fs.size(path)
        with fs.open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                head += fh.read(min(struct.unpack("<Q", head)[0], _MAX_HEADER, size))
        return head, size

    head, size = with_retries(read, f"reading weights {uri}")
    _check_backbone(uri, _header(uri, head, size).get("__metadata__") or {}, spec)


def read_weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file at `uri` (a path, file:// or s3:// URL)."""
    from safetensors.torch import load

    fs, path = filesystem(uri)
    data = with_retries(lambda: fs.cat_file(path), f"reading weights {uri}")
    metadata = _header(uri, data, len(data)).get("__metadata__") or {}
    return load(data), metadata


def load_weights(backbone: nn.Module, uri: str, spec: str) -> None:
    """Load the safetensors file at `uri` into `backbone` (built from `spec`), in place."""
    tensors, metadata = read_weights(uri)
    _check_backbone(uri, metadata, spec)
    try:
        load_pretrained_state_dict(backbone, tensors)
    except MethodError as exc:
        raise MethodError(f"weights {uri!r}: {exc}") from None


def encode_weights(state_dict: Mapping[str, torch.Tensor], spec: str, in_channels: int,
                   extra: Mapping[str, str] | None = None) -> bytes:
    """A backbone's state dict as safetensors bytes, its spec and channel count (and `extra`) as metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    return save(tensors, metadata={META_BACKBONE: spec, META_CHANNELS: str(in_channels), **(extra or {})})


def backbone_states(state_dict: Mapping[str, torch.Tensor], probe: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{module prefix: its state dict} of every copy of `probe`'s architecture inside a method's state dict
    (e.g. "network.featurizer" of ERM, "encoder" of TVN): the prefixes under which every key of `probe`'s own
    state dict (insertion modules excluded) is present. The channel count does not change key names."""
    names = [k for k in probe.state_dict() if not k.startswith("inserts.")]
    found = {}
    for key in state_dict:
        if key == names[0] or key.endswith("." + names[0]):
            prefix = key[: len(key) - len(names[0])]
            if all(prefix + n in state_dict for n in names):
                found[prefix.rstrip(".")] = {n: state_dict[prefix + n] for n in names}
    return found
