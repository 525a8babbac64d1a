"""BEN / plate-consistent BatchNorm training (Lin & Lu 2022; the RxRx1 protocol).

Every training batch is one plate, so BN statistics estimate (and remove) that plate's batch effect;
with `plates_per_step` > 1 the plates of one step are forwarded separately and their gradients
accumulated (mean of per-plate losses), so statistics are never mixed across plates. At test,
BN uses the statistics of the plate-pure test batch (tta track; running buffers are never used).
"""

from __future__ import annotations

import torch

from .adabn import BatchStatsMethod
from .base import Batch, Needs, as_list, queries_with_labels
from .blocks.plate_steps import accumulate_per_plate, require_plate_pure
from .grouping import check_plates_per_step
from .network import accuracy, masked_cross_entropy
from .registry import register


@register("ben")
class BEN(BatchStatsMethod):
    needs = Needs(plate_pure=True, multi_plate=True)
    defaults = {"plates_per_step": 1}
    summary = "Plate-pure training batches (plates forwarded separately); BN statistics of the test plate batch."

    def build(self) -> None:
        check_plates_per_step(self)
        super().build()


    def plate_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """CE of one plate forwarded on its own (train mode: BN uses this plate's statistics)."""
        require_plate_pure(batch, self.name)
        queries = batch.select(batch.queries)
        mask = queries_with_labels(queries)
        logits = self.network(queries.images)
        loss = masked_cross_entropy(logits, queries.labels, mask)
        return loss, {"train_acc": accuracy(logits[mask].detach(), queries.labels[mask])}

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        opt = self.optimizers[0]
        metrics = accumulate_per_plate(opt, as_list(batches), self.plate_loss, self.backward)
        self.optimizer_step(opt, None)
        return metrics
