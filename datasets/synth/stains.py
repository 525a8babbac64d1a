"""The stains a synthetic channel can show: where each dye binds, its texture and its place in the spectrum.

A preset's `channels` name stains of `STAINS` in image-channel order; every per-channel part of the
generator (morphology features, rendering, gain/offset/gamma, cross-talk, vignetting) follows that tuple.
Two channel sets are used by the presets: JUMP's five Cell Painting channels (`CELL_PAINTING`; AGP is
phalloidin and WGA imaged together) and RxRx1's six (`RXRX1`, w1-w6; phalloidin and WGA in channels of
their own). Emission peaks are approximate; only their order matters (cross-talk goes to the next channel
up the spectrum, vignetting grows with wavelength).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# An intensity below this leaves a compartment nearly empty: a perturbation moving it would be invisible.
VISIBLE = 0.1


@dataclass(frozen=True)
class Stain:
    dye: str
    emission_nm: float
    nucleus: float  # baseline intensity in the nucleus (arbitrary fluorescence units)
    cytoplasm: float  # baseline intensity in the cytoplasm
    perinuclear: float  # how strongly its cytoplasm signal piles up near the nucleus (0..1)
    membrane: float  # plasma-membrane ring intensity
    tex_amp: float  # log-normal texture modulation amplitude
    tex_freq: float  # texture frequency, cycles per cell radius (below Nyquist at 32 px)
    tex_aniso: float = 0.0  # orientation selectivity of the texture (fibres)
    permeant: bool = False  # reaches the nucleus whatever the permeabilisation (Hoechst)


STAINS: dict[str, Stain] = {
    "DNA": Stain("Hoechst 33342", 461, 1.00, 0.02, 0.0, 0.0, 0.30, 1.5, permeant=True),
    "ER": Stain("concanavalin A", 519, 0.12, 0.60, 1.0, 0.0, 0.55, 1.0),
    "RNA": Stain("SYTO 14", 549, 0.55, 0.30, 0.3, 0.0, 0.60, 0.8),
    "AGP": Stain("phalloidin + WGA", 580, 0.08, 0.35, 0.0, 0.50, 0.50, 1.2, tex_aniso=2.5),
    "Mito": Stain("MitoTracker Deep Red", 665, 0.06, 0.55, 1.0, 0.0, 0.75, 1.6),
    # RxRx1 images actin and Golgi/plasma membrane apart: cortical actin plus stress fibres; WGA on the
    # membrane and piled up in the perinuclear Golgi.
    "Actin": Stain("phalloidin", 600, 0.06, 0.30, 0.0, 0.40, 0.55, 1.2, tex_aniso=2.5),
    "Golgi": Stain("wheat germ agglutinin", 565, 0.05, 0.45, 1.0, 0.50, 0.65, 1.4),
}
CELL_PAINTING = ("DNA", "ER", "RNA", "AGP", "Mito")  # JUMP-CP's channel order
RXRX1 = ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")  # RxRx1's w1..w6


def values(channels: tuple[str, ...], attr: str) -> np.ndarray:
    """One stain property per channel, in channel order."""
    return np.array([getattr(STAINS[c], attr) for c in channels], dtype=np.float64)


def spectral_order(channels: tuple[str, ...]) -> list[int]:
    """Channel indices from the shortest emission wavelength to the longest."""
    return sorted(range(len(channels)), key=lambda i: STAINS[channels[i]].emission_nm)


def bleed(channels: tuple[str, ...]) -> list[tuple[int, int]]:
    """Cross-talk pairs (source, target): each dye bleeds into the next channel up the spectrum."""
    order = spectral_order(channels)
    return list(zip(order[:-1], order[1:]))
