"""Per-image self-standardisation and seeded augmentation policies, vectorised over a batch.

The policies' D4 and crop are the self-supervised views' own (methods/blocks/views.py): one implementation each.

Policies are named (the `augment` hyperparameter) so a run's augmentation is part of its id.
CutMix is not here: it changes the targets, so it lives with the loss that consumes them (ABRA's
`cutmix_prob`, methods/abra.py), not in a stream that every method shares.
"""

from __future__ import annotations

import torch
from platebench.methods.blocks.views import dihedral
from platebench.methods.blocks.views import random_resized_crop as resized_crop_to

from ..errors import HarnessError


def self_standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per image and channel over H, W; a constant channel gets std 1 (WILDS transform)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std


def flips(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, independently per image (coins drawn on the CPU from `g` whatever the
    images' device, so a run draws the same augmentations on every device)."""
    draws = (torch.rand(2, x.shape[0], generator=g) < 0.5).to(x.device)[:, :, None, None, None]
    x = torch.where(draws[0], x.flip(3), x)
    return torch.where(draws[1], x.flip(2), x)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random box (area fraction in `scale`, aspect in `ratio`) per image, resized back to H×W: the
    self-supervised views' crop (methods/blocks/views.py) at the image's own size."""
    return resized_crop_to(x, g, scale, tuple(x.shape[-2:]), ratio)


AUGMENT_POLICIES = {
    "none": (),
    "flip": (flips,),
    "flip-rot90": (dihedral,),
    "flip-rot90-crop": (random_resized_crop, dihedral),
}


def check_policy(name: str) -> None:
    if name not in AUGMENT_POLICIES:
        raise HarnessError(f"unknown augment policy {name!r}; known: {', '.join(AUGMENT_POLICIES)}")


def augment(x: torch.Tensor, policy: str, g: torch.Generator) -> torch.Tensor:
    check_policy(policy)
    for op in AUGMENT_POLICIES[policy]:
        x = op(x, g)
    return x
