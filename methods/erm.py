"""ERM: pool all training images, minimise mean cross-entropy; eval-mode BatchNorm at test.

Trained on mixed-plate batches (the baseline the batch-effect methods are measured against).
"""

from __future__ import annotations

import torch

from .base import Batch, Method, Needs, as_list, queries_with_labels
from .network import Network, accuracy, masked_cross_entropy
from .registry import register


@register("erm")
class ERM(Method):
    track = "standard"
    needs = Needs(plate_pure=False)
    defaults: dict = {}
    summary = "Empirical risk minimisation on mixed-plate batches; BN running statistics at test."

    def build(self) -> None:
        task = self.task
        self.network = Network(self.backbone_spec, task.channels, task.num_classes, self.hparams["weights"])

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        logits = self.network(batch.images)
        loss = masked_cross_entropy(logits, batch.labels, mask)
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.network(batch.images[batch.queries])
