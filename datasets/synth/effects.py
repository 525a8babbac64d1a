"""Batch effects: per-level parameter draws (source > batch > plate) and the simulated microscope.

Every effect parameter is `base + strength * effect * sum_level(level * sd_level * z_level)` with
z ~ N(0, 1) drawn once per source, per batch and per plate, so plates of one batch share its
batch's (and lab's) deviations. Some effects act on the biology (offsets of the morphology
features: density, cell size, permeabilisation), the rest on image formation, in physical order:
spectral cross-talk -> stain/illumination gain -> vignetting -> optical blur -> photon (shot) and
read noise -> detector offset and gamma -> 8-bit quantisation with saturation.

Per-image self-standardisation undoes channel gain and offset; per-plate normalisation also
absorbs most of the biological offsets. What neither can undo, by design, is the non-linear and
spatial part: gamma, blur, vignetting, cross-talk, magnification (texture frequency), noise level
and saturation. That residue is what separates the methods.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .presets import CHANNELS, Effects

LEVELS = ("source", "batch", "plate")
# Cross-talk: each dye bleeds into the next channel up the spectrum (source -> target).
BLEED = ((0, 1), (1, 2), (2, 3), (3, 4))


@dataclass(frozen=True)
class Param:
    control: str  # the Effects field that scales it
    dims: int
    sd: tuple[float, float, float]  # per level: source, batch, plate
    base: float = 0.0


# Calibrated so quickstart (all multipliers 1) meets tests/test_synth_calibration.py.
PARAMS: dict[str, Param] = {
    "density": Param("density", 1, (0.15, 0.15, 0.10)),  # log cells per site
    "cell_size": Param("cell_size", 1, (0.06, 0.05, 0.03)),  # log cell radius
    "permeabilisation": Param("permeabilisation", 1, (0.15, 0.15, 0.08)),  # log nuclear stain access (not DNA)
    "gain": Param("gain", len(CHANNELS), (0.30, 0.20, 0.10)),  # log stain efficiency x exposure
    "offset": Param("offset", len(CHANNELS), (0.02, 0.015, 0.008), base=0.04),  # detector background
    "gamma": Param("gamma", len(CHANNELS), (0.15, 0.10, 0.04)),  # log detector/processing gamma
    "vignette": Param("vignette", 1, (0.10, 0.06, 0.03), base=0.15),  # illumination fall-off at the corners
    "vignette_x": Param("vignette", 1, (0.12, 0.05, 0.0)),  # optical-axis offset
    "vignette_y": Param("vignette", 1, (0.12, 0.05, 0.0)),
    "blur": Param("blur", 1, (0.30, 0.20, 0.15)),  # log PSF width
    "noise": Param("noise", 1, (0.40, 0.30, 0.20)),  # log (1 / photon budget)
    "magnification": Param("texture_scale", 1, (0.10, 0.04, 0.0)),  # log pixel-size ratio
    "crosstalk": Param("crosstalk", len(BLEED), (0.05, 0.03, 0.0)),  # bleed-through fractions (abs value)
    "edge": Param("edge", 1, (0.30, 0.30, 0.30)),  # log severity of edge-well effects
    "gradient": Param("edge", 1, (0.0, 0.04, 0.04)),  # log-gain slope across the plate's columns
}
BLUR_SIGMA = 0.017  # PSF sd as a fraction of the image side (0.55 px at 32 px)
BLUR_JITTER = 0.10  # per-image focus variation (log)
PHOTONS = 150.0  # photons per fluorescence unit at noise = 0
READ_NOISE = 3.0  # photons
DETECTOR_SCALE = 0.6  # fluorescence unit -> fraction of the 8-bit range
EDGE_DENSITY = -0.30  # log density change in edge wells at severity 1 (evaporation)
EDGE_GAIN = 0.12  # log intensity change in edge wells at severity 1


# Every parameter must be scaled by an existing Effects field (a typo here would silently never scale).
assert {p.control for p in PARAMS.values()} <= {f.name for f in fields(Effects)}


def level_draws(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal draws for one domain (a source, a batch or a plate), one vector per parameter."""
    return {name: rng.standard_normal(p.dims) for name, p in PARAMS.items()}


def resolve(effects: Effects, draws: dict[str, dict[str, np.ndarray]]) -> dict[str, list[float]]:
    """Plate parameters from the draws of its source, batch and plate (`draws[level][param]`)."""
    out = {}
    for name, p in PARAMS.items():
        scale = effects.strength * getattr(effects, p.control)
        total = sum(getattr(effects, lvl) * sd * draws[lvl][name] for lvl, sd in zip(LEVELS, p.sd))
        out[name] = [round(float(v), 6) for v in p.base + scale * total]
    return out


def microscope(fluor: np.ndarray, plate: dict[str, list[float]], well_gain: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Image formation: float fluorescence [N, C, H, W] -> uint8 images, in place where possible.

    `well_gain` [N] is the log gain of each image's well (edge wells, plate gradient).
    """
    n, c, size, _ = fluor.shape
    x = fluor
    for (src, dst), coef in zip(BLEED, plate["crosstalk"]):
        x[:, dst] += np.float32(abs(coef)) * fluor[:, src]
    gain = np.exp(np.asarray(plate["gain"])[None, :] + well_gain[:, None]).astype(np.float32)
    x *= gain[:, :, None, None]
    x *= _vignette(plate, size)[None]
    x = _blur(x, plate["blur"][0], rng)
    photons = np.float32(PHOTONS * np.exp(-plate["noise"][0]))
    signal = np.maximum(x, 0) * photons
    signal += np.sqrt(signal + np.float32(READ_NOISE ** 2)) * rng.standard_normal(x.shape, dtype=np.float32)
    v = signal * np.float32(DETECTOR_SCALE / photons)
    v += np.asarray(np.maximum(plate["offset"], 0), dtype=np.float32)[None, :, None, None]
    np.clip(v, 0, 1, out=v)
    v **= np.exp(np.asarray(plate["gamma"], dtype=np.float32))[None, :, None, None]
    return np.rint(v * 255).astype(np.uint8)


def _vignette(plate: dict, size: int) -> np.ndarray:
    """Illumination [C, H, W]: radial fall-off around an off-centre axis, a little stronger at long wavelengths."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    r2 = (grid[None, :] - plate["vignette_x"][0]) ** 2 + (grid[:, None] - plate["vignette_y"][0]) ** 2
    strength = np.clip(plate["vignette"][0], 0.0, 0.8) * np.linspace(0.8, 1.2, len(CHANNELS), dtype=np.float32)
    return np.clip(1 - strength[:, None, None] * r2[None] / 0.5, 0.05, 1).astype(np.float32)


def _blur(x: np.ndarray, log_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian PSF per image (plate focus x per-image jitter) as two batched matmuls.

    Rows of the kernel matrix are renormalised at the border, so light does not wrap around the
    image (as an FFT blur would) nor darken the edges.
    """
    n, _, size, _ = x.shape
    sigma = BLUR_SIGMA * size * np.exp(log_sigma + BLUR_JITTER * rng.standard_normal(n))
    pos = np.arange(size, dtype=np.float32)
    d2 = (pos[:, None] - pos[None, :]) ** 2
    kernel = np.exp(-d2[None] / (2 * sigma.astype(np.float32)[:, None, None] ** 2))
    kernel /= kernel.sum(axis=2, keepdims=True)  # [N, H, H]: out[i] = sum_j k[i, j] in[j]
    x = np.matmul(x, kernel.transpose(0, 2, 1)[:, None])  # along width
    return np.matmul(kernel[:, None], x)  # along height
