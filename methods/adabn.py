"""AdaBN (Li et al. 2016): ERM training, test-time BatchNorm statistics of the test batch.

`BatchStatsMethod` is the shared base of the BN-statistics family (AdaBN, BEN, ARM-BN, CS-ARM-BN):
an ERM network whose `predict`/`embed` normalise with the statistics of the batch they are given,
never with the running buffers (so they are on the `tta` track).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import Batch, DataRequest, Needs
from .blocks.bn import batch_stats, require_batchnorm
from .blocks.plate_steps import require_plate_pure
from .erm import ERM
from .hparams import Param
from .registry import register

ADAPT_MODES = {
    "plate": "statistics of the whole plate: evaluate with eval batch size = full plate",
    "batch": "statistics of each plate-pure evaluation batch",
}


class BatchStatsMethod(ERM):
    """ERM network; predictions use the test batch's BN statistics (queries only), not the running buffers."""

    track = "tta"

    def build(self) -> None:
        super().build()
        require_batchnorm(self.network.featurizer, self.name, self.backbone_spec)

    def predict(self, batch: Batch) -> torch.Tensor:
        require_plate_pure(batch, self.name)
        with batch_stats(self.network):
            return self.network(batch.images[batch.queries])

    def embed(self, batch: Batch) -> torch.Tensor:
        with batch_stats(self.network):
            return self.network.embed(batch.images)


@register("adabn")
class AdaBN(BatchStatsMethod):
    """Train like ERM on mixed-plate batches; at test every BN layer uses the statistics of the test domain.

    `adapt`: "plate" (default; the reference form: Li et al. replace each BN layer's statistics with those of
    the whole target domain, and the domain here is the plate: the main evaluation hands over each whole
    plate as one batch, records' eval_batch_size 0) or "batch" (each plate-pure test batch of `batch_size`
    gives its own statistics). Both are also measured across the batch-size sweep.
    """

    needs = Needs(plate_pure=False)
    defaults = {"adapt": Param("plate", choices=tuple(ADAPT_MODES))}
    trains_as = "erm"
    predict_hparams = frozenset({"adapt"})
    summary = "ERM training; BN statistics of the (plate-pure) test batch at prediction time."

    @classmethod
    def request_for(cls, hparams) -> DataRequest:
        request = super().request_for(hparams)
        return replace(request, eval_batch_size=0) if hparams["adapt"] == "plate" else request

