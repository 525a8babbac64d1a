"""Batch effects: per-level parameter draws (source > batch > plate) and the simulated microscope.

Every effect parameter is `base + strength * effect * sum_level(level * sd_level * z_level)` with
z ~ N(0, 1) drawn once per source, per batch and per plate, so plates of one batch share its
batch's (and lab's) deviations. Some effects act on the biology: a drift of every morphology
feature (cell state), density, cell size, permeabilisation, responsiveness to perturbations, and a
class-specific perturbation x batch interaction. The rest act on image formation, in physical
order: spectral cross-talk -> stain/illumination gain -> vignetting -> optical blur -> photon
(shot) and read noise -> detector offset and gamma -> 8-bit quantisation with saturation.

Per-image self-standardisation undoes channel gain and offset; per-plate normalisation also
absorbs much of the biological drift (a common shift of a plate's features). What neither can
undo, by design: the non-linear and spatial imaging effects (gamma, blur, vignetting, cross-talk,
magnification = texture frequency, noise level, saturation) and the class-specific interaction.
That residue is what separates the methods (tests/test_synth_calibration.py measures it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import numpy as np

from . import stains
from .biology import feature_space
from .presets import CHANNELS, Effects

LEVELS = ("source", "batch", "plate")


@dataclass(frozen=True)
class Param:
    control: str  # the Effects field that scales it
    dims: int | str  # a count, or what it counts for a preset's channels: "features", "channels", "bleed"
    sd: tuple[float, float, float]  # per level: source, batch, plate
    base: float = 0.0


# Calibrated so quickstart (all multipliers 1) meets tests/test_synth_calibration.py.
_TABLE: dict[str, Param] = {
    # culture/cell-state drift: an offset on every morphology feature, in units of its cell-to-cell sd
    "morphology": Param("morphology", "features", (0.92, 0.92, 0.17)),
    # how strongly cells respond to perturbations (passage, confluence): log multiplier of class effects
    "response": Param("response", 1, (0.10, 0.15, 0.05)),
    "density": Param("density", 1, (0.15, 0.15, 0.10)),  # log cells per site
    "cell_size": Param("cell_size", 1, (0.06, 0.05, 0.03)),  # log cell radius
    "permeabilisation": Param("permeabilisation", 1, (0.15, 0.15, 0.08)),  # log nuclear stain access (not DNA)
    "gain": Param("gain", "channels", (0.30, 0.20, 0.10)),  # log stain efficiency x exposure
    "offset": Param("offset", "channels", (0.02, 0.015, 0.008), base=0.04),  # detector background
    "gamma": Param("gamma", "channels", (0.15, 0.15, 0.05)),  # log detector/processing gamma
    "vignette": Param("vignette", 1, (0.10, 0.06, 0.03), base=0.15),  # illumination fall-off at the corners
    "vignette_x": Param("vignette", 1, (0.12, 0.05, 0.0)),  # optical-axis offset
    "vignette_y": Param("vignette", 1, (0.12, 0.05, 0.0)),
    "blur": Param("blur", 1, (0.30, 0.30, 0.15)),  # log PSF width
    "noise": Param("noise", 1, (0.40, 0.30, 0.20)),  # log (1 / photon budget)
    "magnification": Param("texture_scale", 1, (0.10, 0.08, 0.02)),  # log pixel-size ratio
    "crosstalk": Param("crosstalk", "bleed", (0.05, 0.05, 0.0)),  # bleed-through fractions (abs value), stains.bleed
    "edge": Param("edge", 1, (0.30, 0.30, 0.30)),  # log severity of edge-well effects
    "gradient": Param("edge", 1, (0.0, 0.04, 0.04)),  # log-gain slope across the plate's columns
}
# Perturbation x domain interaction: a class's response bends differently in each lab and batch (per
# class and feature, in units of the feature's cell-to-cell sd). Per-plate normalisation removes a
# plate's common shift, never a class-specific one, so this part of the gap stays open for every method.
INTERACTION_SD = (1.05, 1.05)  # source, batch
BLUR_SIGMA = 0.017  # PSF sd as a fraction of the image side (0.55 px at 32 px)
BLUR_JITTER = 0.10  # per-image focus variation (log)
PHOTONS = 150.0  # photons per fluorescence unit at noise = 0
READ_NOISE = 3.0  # photons
DETECTOR_SCALE = 0.6  # fluorescence unit -> fraction of the 8-bit range
EDGE_DENSITY = -0.30  # log density change in edge wells at severity 1 (evaporation)
EDGE_GAIN = 0.12  # log intensity change in edge wells at severity 1


# Every parameter must be scaled by an existing Effects field (a typo here would silently never scale).
assert {p.control for p in _TABLE.values()} <= {f.name for f in fields(Effects)}


@functools.cache
def params_for(channels: tuple[str, ...]) -> dict[str, Param]:
    """The effect parameters of images in `channels`, each with its number of dimensions."""
    dims = {"features": len(feature_space(channels).names), "channels": len(channels),
            "bleed": len(stains.bleed(channels))}
    return {name: replace(p, dims=dims.get(p.dims, p.dims)) for name, p in _TABLE.items()}


PARAMS = params_for(CHANNELS)  # those of the default channels


def level_draws(rng: np.random.Generator, params: dict[str, Param]) -> dict[str, np.ndarray]:
    """Draws for one domain (a source, a batch or a plate), one vector per parameter. Each multi-channel
    parameter (morphology drift, gain, gamma, ...) and the group of scalar ones (blur, noise, density, ...)
    is a random direction with the norm √D that a D-dimensional standard normal has on average: single
    coordinates stay close to N(0, 1), but the size of each kind of shift is the preset's whatever the
    seed, and only its direction is drawn. (With independent standard normals the ID → new-batches gap of
    two data seeds differed three-fold: a benchmark's difficulty was luck.)"""
    z = {name: rng.standard_normal(p.dims) for name, p in params.items()}
    scalars = [name for name, p in params.items() if p.dims == 1]
    groups = [[name] for name, p in params.items() if p.dims > 1] + [scalars]
    for group in groups:
        flat = np.concatenate([z[name] for name in group])
        scale = np.sqrt(flat.size) / max(float(np.linalg.norm(flat)), 1e-12)
        for name in group:
            z[name] = z[name] * scale
    return z


def resolve(effects: Effects, draws: dict[str, dict[str, np.ndarray]]) -> dict[str, list[float]]:
    """Plate parameters from the draws of its source, batch and plate (`draws[level][param]`)."""
    out = {}
    for name, p in _TABLE.items():
        scale = effects.strength * getattr(effects, p.control)
        total = sum(getattr(effects, lvl) * sd * draws[lvl][name] for lvl, sd in zip(LEVELS, p.sd))
        out[name] = [round(float(v), 6) for v in p.base + scale * total]
    return out


def interaction(effects: Effects, source_draw: np.ndarray, batch_draw: np.ndarray) -> np.ndarray:
    scale = effects.strength * effects.interaction
    return scale * (effects.source * INTERACTION_SD[0] * source_draw + effects.batch * INTERACTION_SD[1] * batch_draw)


def microscope(fluor: np.ndarray, plate: dict[str, list[float]], well_gain: np.ndarray,
               rng: np.random.Generator, channels: tuple[str, ...]) -> np.ndarray:
    """Image formation: float fluorescence [N, C, H, W] of `channels` -> uint8 images, in place where possible.

    `well_gain` [N] is the log gain of each image's well (edge wells, plate gradient).
    """
    n, c, size, _ = fluor.shape
    x = fluor
    for (src, dst), coef in zip(stains.bleed(channels), plate["crosstalk"]):
        x[:, dst] += np.float32(abs(coef)) * fluor[:, src]
    gain = np.exp(np.asarray(plate["gain"])[None, :] + well_gain[:, None]).astype(np.float32)
    x *= gain[:, :, None, None]
    x *= _vignette(plate, size, channels)[None]
    x = _blur(x, plate["blur"][0], rng)
    photons = np.float32(PHOTONS * np.exp(-plate["noise"][0]))
    signal = np.maximum(x, 0) * photons
    signal += np.sqrt(signal + np.float32(READ_NOISE ** 2)) * rng.standard_normal(x.shape, dtype=np.float32)
    v = signal * np.float32(DETECTOR_SCALE / photons)
    v += np.asarray(np.maximum(plate["offset"], 0), dtype=np.float32)[None, :, None, None]
    return _detector(v, np.exp(np.asarray(plate["gamma"])))


_LUT_LEVELS = 4096


def _detector(v: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Saturate to [0, 1], apply each channel's gamma and quantise to 8 bits.

    Done with a per-channel lookup table over 4096 input levels: a power per pixel is the single most
    expensive operation at 96 px, and the table's input resolution (12 bits) is far finer than the output.
    """
    levels = np.linspace(0, 1, _LUT_LEVELS)
    luts = np.rint(255 * levels[None, :] ** gamma[:, None]).astype(np.uint8)  # [C, levels]
    np.clip(v, 0, 1, out=v)
    v *= np.float32(_LUT_LEVELS - 1)
    idx = (v + np.float32(0.5)).astype(np.int16)
    out = np.empty(v.shape, dtype=np.uint8)
    for c in range(v.shape[1]):
        out[:, c] = luts[c][idx[:, c]]
    return out


def _vignette(plate: dict, size: int, channels: tuple[str, ...]) -> np.ndarray:
    """Illumination [C, H, W]: radial fall-off around an off-centre axis, a little stronger at long wavelengths."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    r2 = (grid[None, :] - plate["vignette_x"][0]) ** 2 + (grid[:, None] - plate["vignette_y"][0]) ** 2
    by_wavelength = np.empty(len(channels), dtype=np.float32)
    by_wavelength[stains.spectral_order(channels)] = np.linspace(0.8, 1.2, len(channels), dtype=np.float32)
    strength = np.clip(plate["vignette"][0], 0.0, 0.8) * by_wavelength
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
    # (contiguous operands keep numpy's matmul on its BLAS path: a transposed view is 5x slower)
    x = np.matmul(x, np.ascontiguousarray(kernel.transpose(0, 2, 1))[:, None])  # along width
    return np.matmul(kernel[:, None], x)  # along height
