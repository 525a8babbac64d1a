"""ARM-BN (Zhang, Marklund et al., "Adaptive Risk Minimization", NeurIPS 2021).

Meta-training mimics test-time adaptation: each step is a meta-batch of `plates_per_step` plates ×
`batch_size` images (the support chunk); the concatenation is forwarded chunk by chunk, each chunk
normalised with its own BN statistics, and the cross-entropy is averaged over all images of the
meta-batch, with one optimiser step (henrikmarklund/arm ARM_BN). At test the plate-pure eval batch
is the context: BN uses its statistics only. To mimic training, evaluate with eval batch size =
`batch_size` (the support size).
"""

from __future__ import annotations

import torch

from .adabn import BatchStatsMethod
from .base import Batch, Needs, as_list, queries_with_labels
from .blocks.bn import forward_per_group, groups_from_sizes
from .blocks.plate_steps import require_plate_pure
from .grouping import check_plates_per_step
from .network import accuracy, masked_cross_entropy
from .registry import register


@register("arm-bn")
class ARMBN(BatchStatsMethod):
    needs = Needs(plate_pure=True, multi_plate=True)
    defaults = {"plates_per_step": 4}
    summary = "Meta-learned BN adaptation: each plate chunk of a meta-batch normalised by its own statistics."

    def build(self) -> None:
        check_plates_per_step(self)
        super().build()


    def forward_meta_batch(self, batches: list[Batch]) -> tuple[torch.Tensor, Batch]:
        """Logits of the concatenated query rows, each plate chunk normalised with its own statistics."""
        chunks = []
        for batch in batches:
            require_plate_pure(batch, self.name)
            chunks.append(batch.select(batch.queries))
        meta = Batch.concat(chunks)
        groups = groups_from_sizes([len(c) for c in chunks], device=meta.images.device)
        return forward_per_group(self.network, meta.images, groups), meta

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        logits, meta = self.forward_meta_batch(as_list(batches))
        mask = queries_with_labels(meta)
        loss = masked_cross_entropy(logits, meta.labels, mask)
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "train_acc": accuracy(logits[mask].detach(), meta.labels[mask])}
