"""DSU — Domain Shifts with Uncertainty (Li et al., ICLR 2022; methods-research §3.7).

Training: `plates_per_step` plate-pure batches are concatenated into one forward, so the batch
spread Σ of the instance statistics covers several plates (one plate would give only within-plate
spread). After each stage in `layers`, with probability `p`, every sample's channel mean/std is
resampled as μ_i + ε₁Σ_μ, σ_i + ε₂Σ_σ (ε ~ N(0, I)). Placement default follows the official code
(after the stem and every stage; our stem includes the max-pool, so 5 points instead of 6). Test:
identity, prediction is ERM's (standard track).
"""

from __future__ import annotations

from .base import MethodError, Needs
from .blocks.style import DSULayer, parse_insertion_points
from .erm import ERM
from .grouping import check_plates_per_step, multi_plate_request
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
    }
    summary = "Resamples instance feature statistics from Gaussians whose spread is measured across plates."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        check_plates_per_step(self)
        if not 0.0 <= hp["p"] <= 1.0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'p' must be in [0, 1], got {hp['p']}")
        points = parse_insertion_points(self.name, hp["layers"])
        self.style_layers = [DSULayer(hp["p"], hp["eps"]) for _ in points]
        for point, layer in zip(points, self.style_layers):
            self.network.featurizer.set_insert(point, layer)

    def data_request(self):
        return multi_plate_request(self)
