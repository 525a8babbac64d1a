"""The biology of the synthetic plates: morphology features, perturbation classes and cell types.

A cell is described by a vector of morphology features (log sizes, shape, per-compartment stain
intensities, organelle texture amplitude and frequency, ...). Every feature has a natural scale:
the cell-to-cell standard deviation. A perturbation class moves a few features by `class_effect`
scales (so a single cell barely differs from a control; a well's cells together do), a compound
adds its own smaller twist, and a cell type shifts the baseline of the shape features. Batch effects
of biological origin (density, cell size, permeabilisation) are offsets in this same space
(effects.py), which is what makes them partly removable by per-plate normalisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import stains
from .presets import Biology

# (name, cell-to-cell sd). Image-level features (density, textures) vary per image, not per cell.
_SHAPE = [("cell_size", 0.12), ("nucleus_ratio", 0.10), ("elongation", 0.18), ("irregularity", 0.05)]
_PER_CHANNEL = [("int_nuc", 0.15), ("int_cyto", 0.15), ("tex_amp", 0.20), ("tex_freq", 0.12)]
_OTHER = [("density", 0.20), ("perinuclear", 0.25), ("membrane", 0.20)]
# Cell types differ in shape and size, not in what the stains bind.
_CELL_TYPE = ("cell_size", "nucleus_ratio", "elongation", "irregularity", "density", "perinuclear", "membrane")


@dataclass(frozen=True)
class FeatureSpace:
    """The morphology features of cells imaged in `channels`: four per channel, the rest shared."""

    channels: tuple[str, ...]
    names: list[str]
    scales: np.ndarray  # cell-to-cell sd of each feature
    index: dict[str, int]
    image_level: np.ndarray  # bool mask of the features that vary per image, not per cell
    # Features a perturbation class may move: not the near-empty compartments (DNA dye in the cytoplasm,
    # membrane and Mito dyes in the nucleus), whose changes would be invisible and make a class unlearnable.
    class_features: np.ndarray
    cell_type_features: list[int]

    def block(self, name: str) -> list[int]:
        """Indices of a per-channel feature (`int_nuc`, ...), in channel order."""
        return [self.index[f"{name}_{c}"] for c in self.channels]


@functools.cache
def feature_space(channels: tuple[str, ...]) -> FeatureSpace:
    names = [n for n, _ in _SHAPE] + [f"{n}_{c}" for n, _ in _PER_CHANNEL for c in channels] + [n for n, _ in _OTHER]
    scales = np.array([s for _, s in _SHAPE] + [s for _, s in _PER_CHANNEL for _c in channels] +
                      [s for _, s in _OTHER], dtype=np.float64)
    index = {name: i for i, name in enumerate(names)}
    invisible = {f"int_nuc_{c}" for c in channels if stains.STAINS[c].nucleus < stains.VISIBLE} | \
        {f"int_cyto_{c}" for c in channels if stains.STAINS[c].cytoplasm < stains.VISIBLE}
    return FeatureSpace(
        channels=channels, names=names, scales=scales, index=index,
        image_level=np.array([n.startswith(("tex_", "density")) for n in names]),
        class_features=np.array([i for i, n in enumerate(names) if n not in invisible]),
        cell_type_features=[index[n] for n in _CELL_TYPE])


CONTROL = "DMSO"


@dataclass(frozen=True)
class Perturbations:
    """Class and compound effects (feature offsets, in natural units) drawn from the dataset seed."""

    classes: list[str]
    compounds: list[list[str]]  # compounds[k] = ids of class k's compounds
    effects: np.ndarray  # [num_classes, perturbations_per_class, F]


def perturbations(bio: Biology, space: FeatureSpace, rng: np.random.Generator) -> Perturbations:
    n_feat = len(space.names)
    k, per = bio.num_classes, bio.perturbations_per_class
    effects = np.zeros((k, per, n_feat))
    for c in range(k):
        chosen = rng.choice(space.class_features, size=min(bio.features_per_class, len(space.class_features)),
                            replace=False)
        direction = np.zeros(n_feat)
        direction[chosen] = rng.choice([-1.0, 1.0], size=len(chosen)) * rng.uniform(0.7, 1.3, size=len(chosen))
        for j in range(per):
            twist = rng.normal(0.0, bio.compound_effect, size=n_feat)
            effects[c, j] = (bio.class_effect * direction + twist) * space.scales
    classes = [f"moa{c:02d}" for c in range(k)]
    compounds = [[f"cpd{c:02d}-{j}" for j in range(per)] for c in range(k)]
    return Perturbations(classes=classes, compounds=compounds, effects=effects)


def cell_type_offsets(names: tuple[str, ...], bio: Biology, space: FeatureSpace, rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
    """Baseline offsets per cell type; the first type is the reference (zero offset)."""
    out = {}
    for i, name in enumerate(names):
        off = np.zeros(len(space.names))
        if i:
            off[space.cell_type_features] = rng.normal(0.0, bio.cell_type_effect, size=len(space.cell_type_features))
        out[name] = off * space.scales
    return out


def sample_cells(image_means: np.ndarray, max_cells: int, cells_per_site: float, variation: float,
                 space: FeatureSpace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell features [N, M, F] around each image's mean [N, F], and the active-cell mask [N, M].

    Image-level features are shared by the image's cells; the number of cells follows a Poisson law
    whose mean scales with exp(density), at least one cell per image.
    """
    n, n_feat = image_means.shape
    noise = rng.standard_normal((n, max_cells, n_feat)) * (variation * space.scales)
    noise[:, :, space.image_level] = 0.0
    feats = image_means[:, None, :] + noise
    lam = cells_per_site * np.exp(image_means[:, space.index["density"]])
    count = np.clip(rng.poisson(lam), 1, max_cells)
    active = np.arange(max_cells)[None, :] < count[:, None]
    return feats, active
