"""MixStyle (Zhou et al., ICLR 2021): mix instance feature statistics across plates.

Reference: paper "Domain Generalization with MixStyle"; code github.com/KaiyangZhou/mixstyle-release
(`MixStyle`). After each backbone stage in `layers`, with probability `p`, every sample's detached channel
mean/std (unbiased variance over (h, w), as in the reference) is replaced by a Beta(α, α) mix of its own
and a partner's. mix="random": partners are a random permutation of the step's rows. mix="crossdomain":
the reference's two-domain pairing, every row paired one-to-one with a row of the other domain (see
`MixStyleLayer`); here the two domains are the first and the second half of the step's plates, so
`plates_per_step` must be even (with the default 2, each domain is one plate). tests/test_reference_style.py
checks outputs, input gradients and the cross-domain pairing against the reference equations. Test time:
the layers are the identity and prediction is ERM's (standard track).

Harness choice: each step receives `plates_per_step` plate-pure batches, concatenated into one forward so
that styles mix *across* plates (with one plate per batch MixStyle would only mix within a plate). When a
plate's last batch is shorter the halves differ in size, which the reference does not handle; partners
then still come from the other half, reused as evenly as possible.
"""

from __future__ import annotations

from .base import Batch, MethodError, Needs, as_list
from .blocks.style import MixStyleLayer, parse_insertion_points
from .erm import ERM
from .grouping import check_plates_per_step, plate_positions
from .registry import register


@register("mixstyle")
class MixStyle(ERM):
    track = "standard"
    needs = Needs(plate_pure=True, multi_plate=True)
    defaults = {
        "p": 0.5,  # probability that a layer mixes on a given forward
        "alpha": 0.1,  # Beta(α, α) for the mixing weight λ
        "layers": "res1,res2,res3",  # insertion points (comma-separated)
        "mix": "random",  # random | crossdomain (first half of the step's plates paired with the second half)
        "eps": 1e-6,
        "plates_per_step": 2,
    }
    summary = "Mixes instance feature statistics between samples of different plates (train only)."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        n_plates = check_plates_per_step(self)
        if not 0.0 <= hp["p"] <= 1.0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'p' must be in [0, 1], got {hp['p']}")
        if not hp["alpha"] > 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'alpha' must be > 0, got {hp['alpha']}")
        if not hp["eps"] > 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'eps' must be > 0, got {hp['eps']}")
        if hp["mix"] not in MixStyleLayer.MIXES:
            raise MethodError(f"method {self.name!r}: hyperparameter 'mix' must be one of {MixStyleLayer.MIXES}, "
                              f"got {hp['mix']!r}")
        if hp["mix"] == "crossdomain" and n_plates % 2:
            raise MethodError(f"method {self.name!r}: hyperparameter 'plates_per_step' must be even with "
                              f"mix='crossdomain' (its two domains are the two halves of the step's plates), "
                              f"got {n_plates}")
        points = parse_insertion_points(self.name, hp["layers"])
        self.style_layers = [MixStyleLayer(hp["p"], hp["alpha"], hp["eps"], hp["mix"]) for _ in points]
        for point, layer in zip(points, self.style_layers):
            self.network.featurizer.set_insert(point, layer)


    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batches = as_list(batches)
        groups = plate_positions(batches)
        for layer in self.style_layers:
            layer.set_groups(groups)
        try:
            return super().training_step(batches)
        finally:
            for layer in self.style_layers:
                layer.set_groups(None)
