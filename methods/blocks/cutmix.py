"""CutMix inside one (plate-pure) batch, with soft targets (Yun et al. 2019; in ABRA's recipe, methods/abra.py).

Partners are drawn among the `eligible` rows only (labelled, non-control), so a pasted patch always
comes from the same plate and carries a class. One box and one λ per batch; λ is recomputed from the
clipped box, so the soft target λ·onehot(y_i) + (1 − λ)·onehot(y_j) matches the pasted area exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixedTargets:
    """Soft target λ·onehot(labels) + (1 − λ)·onehot(partner_labels)."""

    labels: torch.Tensor
    partner_labels: torch.Tensor
    lam: float

    @staticmethod
    def hard(labels: torch.Tensor) -> MixedTargets:
        return MixedTargets(labels, labels, 1.0)

    def loss(self, per_row, outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over `mask` rows of λ·f(o, labels) + (1 − λ)·f(o, partner_labels), f = `per_row`(outputs, labels).

        With no row in `mask` this is a zero that still depends on `outputs` (every rank backpropagates).
        """
        if not bool(mask.any()):
            return outputs.sum() * 0.0
        rows = outputs[mask]
        loss = per_row(rows, self.labels[mask])
        if self.lam < 1.0:
            loss = self.lam * loss + (1.0 - self.lam) * per_row(rows, self.partner_labels[mask])
        return loss.mean()


def cutmix_within(images: torch.Tensor, labels: torch.Tensor, eligible: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, MixedTargets]:
    """Paste a random box from a partner row (a permutation of the eligible rows) into each eligible row."""
    n, _, h, w = images.shape
    rows = eligible.nonzero().flatten()
    partner = torch.arange(n, device=images.device)
    if rows.numel() < 2:
        return images, MixedTargets.hard(labels)
    partner[rows] = rows[torch.randperm(rows.numel(), generator=generator).to(rows.device)]
    lam = float(torch.rand((), generator=generator))  # Beta(1, 1)
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[rows, :, y1:y2, x1:x2] = images[partner[rows], :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, MixedTargets(labels, labels[partner], lam)
