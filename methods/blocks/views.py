"""Seeded augmented views for the self-supervised methods (simclr, byol, dino), batched on the images' device.

A view is random resized crop → a random element of D4 → per-channel intensity/contrast jitter → Gaussian blur,
the order of the references' pipelines (crop, flip, colour jitter, blur) with microscopy's stand-ins: D4 for the
horizontal flip (a micrograph has no orientation) and a per-channel affine jitter for RGB colour jitter (a
fluorescence channel has no hue, saturation or grey level; see `intensity_jitter`). Solarisation and random
greyscale have no meaning on standardised multi-channel images and are left out.

Every random number is drawn on the CPU from the caller's `torch.Generator` and then moved to the images'
device, so the same generator gives the same views on a CPU and on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hparams import NON_NEGATIVE, Param
from ..precision import full_precision

# The references' blur: σ uniform in [0.1, 2.0] px on 224 px crops; here in units of the crop's side.
BLUR_SIGMA = (0.1 / 224, 2.0 / 224)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float],
                        size: tuple[int, int], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A box of area fraction U(scale) and log-uniform aspect ratio per image, resized (bilinear) to `size`.
    Boxes wider or taller than the image are clamped to it (torchvision re-draws them instead)."""
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], g)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), g))
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A uniformly random element of D4 per image (random transpose, then horizontal and vertical flips);
    horizontal and vertical flips only on non-square images."""
    n = x.shape[0]
    draws = (torch.rand(3, n, generator=g) < 0.5).to(x.device)[:, :, None, None, None]
    if x.shape[2] == x.shape[3]:
        x = torch.where(draws[0], x.transpose(2, 3), x)
    x = torch.where(draws[1], x.flip(3), x)
    return torch.where(draws[2], x.flip(2), x)


def intensity_jitter(x: torch.Tensor, g: torch.Generator, p: float, brightness: float,
                     contrast: float) -> torch.Tensor:
    """With probability `p` per image: x_c ← a_c·x_c + b_c for every channel c independently, a_c ~ U[1 − contrast,
    1 + contrast], b_c ~ U[−brightness, brightness]. The images are standardised (mean 0, std 1 per channel), so
    a raw-intensity gain would be undone by the standardisation: brightness is a shift in units of the channel's
    std, contrast a gain around its mean (the plate-to-plate nuisances of fluorescence channels)."""
    n, c = x.shape[:2]
    apply = torch.rand(n, generator=g) < p
    gain = _uniform(n * c, 1 - contrast, 1 + contrast, g).view(n, c)
    shift = _uniform(n * c, -brightness, brightness, g).view(n, c)
    gain = torch.where(apply[:, None], gain, torch.ones_like(gain))
    shift = torch.where(apply[:, None], shift, torch.zeros_like(shift))
    gain, shift = (t.to(device=x.device, dtype=x.dtype)[:, :, None, None] for t in (gain, shift))
    return x * gain + shift


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float,
                  sigma: tuple[float, float] = BLUR_SIGMA) -> torch.Tensor:
    """With probability `p` per image: a separable Gaussian blur with σ ~ U(sigma) × the image side (the
    references' σ ∈ [0.1, 2] px at 224 px), radius ⌈3σ_max⌉, reflected borders."""
    n, c, h, w = x.shape
    apply = torch.rand(n, generator=g) < p
    side = min(h, w)
    if side < 2:
        return x
    sig = _uniform(n, sigma[0] * side, sigma[1] * side, g)
    radius = max(1, min(math.ceil(3 * sigma[1] * side), side - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sig.double()[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (offsets == 0).double().expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, identity)  # an image not blurred goes through a delta kernel
    kernel = kernel.to(device=x.device, dtype=x.dtype).repeat_interleave(c, 0)  # one kernel per (image, channel)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.view(n, c, h, w)


def jitter_hparams(brightness: float, contrast: float, jitter_prob: float = 0.8) -> dict[str, Param]:
    """The views' intensity/contrast jitter hyperparameters with a method's reference defaults (ViewSpec's
    fields of the same names)."""
    return {"brightness": Param(brightness, **NON_NEGATIVE), "contrast": Param(contrast, low=0.0, high=1.0),
            "jitter_prob": Param(jitter_prob, low=0.0, high=1.0)}


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: crop area range, output side (a fraction of the input's), blur and jitter settings."""

    scale: tuple[float, float]
    blur_prob: float
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    size: float = 1.0

    @full_precision  # the same views under every precision: grid sampling and blur in float32
    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = (max(1, round(x.shape[2] * self.size)), max(1, round(x.shape[3] * self.size)))
        x = random_resized_crop(x, g, self.scale, out)
        x = dihedral(x, g)
        x = intensity_jitter(x, g, self.jitter_prob, self.brightness, self.contrast)
        return gaussian_blur(x, g, self.blur_prob)


def step_generator() -> torch.Generator:
    """A CPU generator for one step's views, seeded by one draw from torch's global generator: the harness seeds
    that generator per run, rank and epoch, so views are reproducible (and resume exactly) without any state here."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
