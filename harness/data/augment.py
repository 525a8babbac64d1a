"""Per-image self-standardisation and seeded augmentation policies, vectorised over a batch.

Policies are named (the `augment` hyperparameter) so a run's augmentation is part of its id.
CutMix is not here: it changes the targets, so it lives with the loss that consumes them (ABRA's
`cutmix_prob`, methods/abra.py), not in a stream that every method shares.

The crop and D4 here do what methods/blocks/views.py's do for the self-supervised views; they are not shared
because the views' crop draws its uniforms in another float order (1e-5 apart), and switching ABRA's default
policy to it moved the published default leaderboard's ABRA rows (checked 2026-12-07 with `platebench bench`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import HarnessError


def self_standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per image and channel over H, W; a constant channel gets std 1 (WILDS transform)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(a.device)[:, None, None, None], a, b)


def _coins(n: int, g: torch.Generator) -> torch.Tensor:
    """A fair coin per image, drawn from the CPU generator `g` whatever the images' device (so a run draws the
    same augmentations on every device)."""
    return torch.rand(n, generator=g) < 0.5


def flips(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, independently per image."""
    n = x.shape[0]
    x = _where(_coins(n, g), x.flip(3), x)
    return _where(_coins(n, g), x.flip(2), x)


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A uniformly random element of the square's symmetry group D4 per image: the 8 combinations of
    90° rotations and flips, as random transpose + horizontal flip + vertical flip (3 batched selects
    instead of one masked copy per rotation)."""
    if x.shape[2] != x.shape[3]:
        return flips(x, g)  # 90° turns need square images
    x = _where(_coins(x.shape[0], g), x.transpose(2, 3), x)
    return flips(x, g)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random box (area fraction in `scale`, aspect in `ratio`) per image, resized back to H×W (the box
    drawn on the CPU from `g`, the resampling on the images' device)."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=g)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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
