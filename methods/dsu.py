"""DSU — Domain Shifts with Uncertainty (Li et al., ICLR 2022).

Reference: paper "Uncertainty Modeling for Out-of-Distribution Generalization"; code
github.com/lixiaotong97/DSU (`DistributionUncertainty`). After each stage in `layers`, with probability
`p`, every sample's channel mean/std is resampled as μ_i + ε₁Σ_μ, σ_i + ε₂Σ_σ (ε ~ N(0, I)), with μ, σ
computed with the unbiased variance over (h, w) and Σ the unbiased spread of μ, σ over the batch;
gradients flow through μ, σ and Σ, as in the reference. tests/test_reference_style.py checks the layer's
output and input gradient against the reference equations (float64, 1e-5). Test time: identity,
prediction is ERM's (standard track).

Harness choices: `plates_per_step` plate-pure batches are concatenated into one forward, so Σ covers
several plates (one plate would give only within-plate spread). Placement default follows the official
code (after the stem and every stage; our stem includes the max-pool, so 5 points instead of 6).

Deliberate option (not the default): `detach_spread=True` stops the gradient through Σ (the project's
earlier behaviour); forward outputs are unchanged, input gradients differ.
"""

from __future__ import annotations

from .base import MethodError, Needs
from .blocks.style import DSULayer, parse_insertion_points
from .erm import ERM
from .grouping import check_plates_per_step
from .registry import register


@register("dsu")
class DSU(ERM):
    track = "standard"
    needs = Needs(plate_pure=True, multi_plate=True)
    defaults = {
        "p": 0.5,  # probability that a layer perturbs on a given forward
        "layers": "stem,res1,res2,res3,res4",
        "eps": 1e-6,
        "plates_per_step": 2,
        "detach_spread": False,  # True: no gradient through the batch spread Σ (the reference lets it flow)
    }
    summary = "Resamples instance feature statistics from Gaussians whose spread is measured across plates."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        check_plates_per_step(self)
        if not 0.0 <= hp["p"] <= 1.0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'p' must be in [0, 1], got {hp['p']}")
        if not hp["eps"] > 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'eps' must be > 0, got {hp['eps']}")
        points = parse_insertion_points(self.name, hp["layers"])
        self.style_layers = [DSULayer(hp["p"], hp["eps"], hp["detach_spread"]) for _ in points]
        for point, layer in zip(points, self.style_layers):
            self.network.featurizer.set_insert(point, layer)

