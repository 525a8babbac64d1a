"""Typical Variation Normalization on embeddings (Ando et al. 2017), the per-plate form of the CS-ARM-BN code.

Form implemented: github ml-jku/cs-arm-bn plt/data/transforms.py TVN:
  fit (global, from control embeddings):   scaler (m, s) and full PCA P of all controls;
                                           T = Cov(controls standardised per plate in PCA space) + ridge·I
  transform (one plate's context, b):      z = ((e − m)/s)·P;  S_b = per-dimension standardisation on the
                                           plate's controls;  Σ_b = Cov(S_b(z_controls)) + ridge·I;
                                           out = S_b(z)·Σ_b^{-1/2}·T^{1/2}
Differences from that code: the per-plate statistics come from the controls of the batch at hand
(the plate's context), not from every control of the plate; the final global StandardScaler is
omitted (in front of a linear head it only reparametrises the head). All arithmetic is float64.
Pure functions here; the method (methods/tvn.py) owns when they are fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_EPS = 1e-12  # a dimension with (numerically) zero spread is left unscaled, as sklearn's StandardScaler does


@dataclass
class TVNFit:
    mean: torch.Tensor  # [d] global control mean
    scale: torch.Tensor  # [d] global control std
    components: torch.Tensor  # [d, d] PCA directions as columns, by decreasing variance
    target_sqrt: torch.Tensor  # [d, d] T^{1/2}

    @staticmethod
    def identity(dim: int, ridge: float) -> TVNFit:
        eye = torch.eye(dim, dtype=torch.float64)
        return TVNFit(torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64), eye,
                      eye * (1.0 + ridge) ** 0.5)


def _std(x: torch.Tensor) -> torch.Tensor:
    std = x.std(0, unbiased=False)
    return torch.where(std > _EPS, std, torch.ones_like(std))


def _sym_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(_EPS) ** power) @ vectors.T


def _cov(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 2:
        raise ValueError(f"TVN needs at least 2 control embeddings per plate context, got {x.shape[0]}")
    centred = x - x.mean(0)
    return centred.T @ centred / (x.shape[0] - 1)


def pca_components(x: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of Cov(x) as columns, decreasing variance, sign fixed (largest |entry| positive)
    so that refitting on the same data gives the same basis."""
    values, vectors = torch.linalg.eigh(_cov(x))
    vectors = vectors[:, torch.argsort(values, descending=True)]
    pivot = vectors.abs().argmax(0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1], device=vectors.device)])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def project(fit: TVNFit, x: torch.Tensor) -> torch.Tensor:
    return ((x.double() - fit.mean) / fit.scale) @ fit.components


def standardise_on(z: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """Per-dimension standardisation of z with the mean/std of the control rows (the plate scaler S_b)."""
    ref = z[controls]
    return (z - ref.mean(0)) / _std(ref)


def fit_tvn(contexts: Sequence[torch.Tensor], ridge: float) -> TVNFit:
    """Global statistics from control embeddings grouped by plate context ([n_i, d] each)."""
    if not contexts:
        raise ValueError("fit_tvn: no control embeddings")
    controls = torch.cat([c.double() for c in contexts])
    mean, scale = controls.mean(0), _std(controls)
    components = pca_components((controls - mean) / scale)
    fit = TVNFit(mean, scale, components, torch.empty(0))
    per_plate = [standardise_on(z, torch.ones(len(z), dtype=torch.bool)) for z in (project(fit, c) for c in contexts)]
    target = _cov(torch.cat(per_plate)) + ridge * torch.eye(controls.shape[1], dtype=torch.float64,
                                                            device=controls.device)
    fit.target_sqrt = _sym_power(target, 0.5)
    return fit


def tvn_transform(fit: TVNFit, embeddings: torch.Tensor, controls: torch.Tensor, ridge: float) -> torch.Tensor:
    """TVN of one plate context: `embeddings` [n, d] (queries and controls), `controls` bool mask [n]. float64."""
    s = standardise_on(project(fit, embeddings), controls)
    source = _cov(s[controls]) + ridge * torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    return s @ _sym_power(source, -0.5) @ fit.target_sqrt
