"""AdaBN (Li et al. 2016): ERM training, test-time BatchNorm statistics of the test batch.

`BatchStatsMethod` is the shared base of the BN-statistics family (AdaBN, BEN, ARM-BN, CS-ARM-BN):
an ERM network whose `predict`/`embed` normalise with the statistics of the batch they are given,
never with the running buffers (so they are on the `tta` track).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import Batch, DataRequest, MethodError, Needs
from .blocks.bn import batch_stats
from .blocks.plate_steps import require_plate_pure
from .erm import ERM
from .registry import register

ADAPT_MODES = {
    "batch": "statistics of each plate-pure evaluation batch",
    "plate": "statistics of the whole plate: evaluate with eval batch size = full plate",
}


class BatchStatsMethod(ERM):
    """ERM network; predictions use the test batch's BN statistics (queries only), not the running buffers."""

    track = "tta"

    def predict(self, batch: Batch) -> torch.Tensor:
        require_plate_pure(batch, self.name)
        with batch_stats(self.network):
            return self.network(batch.images[batch.queries])

    def embed(self, batch: Batch) -> torch.Tensor:
        with batch_stats(self.network):
            return self.network.embed(batch.images)


@register("adabn")
class AdaBN(BatchStatsMethod):
    """Train like ERM on mixed-plate batches; at test every BN layer uses the plate-pure test batch's statistics.

    `adapt`: "batch" (per-batch variant, methods-research §3.2 (a): the main evaluation uses test batches of
    `batch_size`) or "plate" (full-domain variant (b): the main evaluation hands over each whole plate as
    one batch, records' eval_batch_size 0). Both are also measured across the batch-size sweep. For
    plates too large for one forward,
    `blocks.bn.adapt_to_domain` computes the exact full-plate statistics from chunks into the running
    buffers (then predict in eval mode with `self.network`).
    """

    needs = Needs(plate_pure=False)
    defaults = {"adapt": "batch"}
    trains_as = "erm"
    predict_hparams = frozenset({"adapt"})
    summary = "ERM training; BN statistics of the (plate-pure) test batch at prediction time."

    def data_request(self) -> DataRequest:
        request = super().data_request()
        return replace(request, eval_batch_size=0) if self.hparams["adapt"] == "plate" else request

    def build(self) -> None:
        if self.hparams["adapt"] not in ADAPT_MODES:
            raise MethodError(f"method 'adabn': hyperparameter 'adapt' must be one of {sorted(ADAPT_MODES)}, "
                              f"got {self.hparams['adapt']!r}")
        super().build()
