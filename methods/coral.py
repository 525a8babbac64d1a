"""Deep CORAL (Sun & Saenko 2016; DomainBed/WILDS form) across the plates of a step.

Each step receives `plates_per_step` plate-pure batches (the groups). The penalty, averaged over all
pairs of groups (a, b) with at least 2 rows each, is mean_c(μ_a − μ_b)² + mean_{c,c'}(Cov_a − Cov_b)²
on the pooled features (unbiased covariance); L = CE + w·penalty. Test: prediction is ERM's.
"""

from __future__ import annotations

import itertools

import torch

from .base import Batch, Needs, as_list, queries_with_labels
from .erm import ERM
from .grouping import check_plates_per_step, plate_positions
from .network import accuracy, masked_cross_entropy
from .precision import full_precision
from .registry import register


@full_precision  # means and covariances of the features in float32, as the reference computes them
def coral_penalty(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean over group pairs of the squared mean and covariance differences; 0 with fewer than 2 usable groups."""
    stats = []
    for g in torch.unique(groups):
        z = features[groups == g]
        if z.shape[0] >= 2:
            stats.append((z.mean(0), torch.cov(z.T, correction=1)))
    if len(stats) < 2:
        return features.sum() * 0.0
    pairs = [((mu_a - mu_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean())
             for (mu_a, cov_a), (mu_b, cov_b) in itertools.combinations(stats, 2)]
    return torch.stack(pairs).mean()


@register("coral")
class CORAL(ERM):
    track = "standard"
    needs = Needs(plate_pure=True, multi_plate=True)
    defaults = {"batch_size": 16, "penalty_weight": 0.1, "plates_per_step": 4}
    summary = "Aligns feature means and covariances between the plates of each step (Deep CORAL)."

    def build(self) -> None:
        super().build()
        check_plates_per_step(self, minimum=2)


    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batches = as_list(batches)
        batch = Batch.concat(batches)
        mask = queries_with_labels(batch)
        z = self.network.featurizer(batch.images)
        logits = self.network.classifier(z)
        ce = masked_cross_entropy(logits, batch.labels, mask)
        rows = batch.queries
        penalty = coral_penalty(z[rows], plate_positions(batches)[rows])
        loss = ce + self.hparams["penalty_weight"] * penalty
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "ce": float(ce.detach()), "penalty": float(penalty.detach()),
                "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}
