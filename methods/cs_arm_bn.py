"""CS-ARM-BN: control-stabilised ARM-BN (Sanchez-Fernandez et al. 2026; read from github ml-jku/cs-arm-bn).

Every plate-pure batch (L queries) arrives with M−L negative controls of the same plate appended
(is_control=True). Every BN layer normalises with the statistics of queries ∪ controls, so a
batch's mean is (L/M)·μ_Q + (1−L/M)·μ_C: label shift among the queries moves it L/M times less.
The loss is the CE of the queries only; gradients of `plates_per_step` plates (the code's acc_steps)
are accumulated into one optimiser step. At test the same: queries + that plate's controls forwarded
with their pooled statistics (running buffers unused), query logits returned.

Defaults differ from the paper for CPU runs: n_controls = eval_n_controls = 32 (paper 128),
batch_size L = 32 (paper 64), plates_per_step 4 (paper 8); constant learning rate as in the paper.
`stats_from="controls"` is the repo's controls-only ablation ("BEN" trainer there): statistics of
the control rows, applied to the queries. The paper body was not retrievable; the method is taken
from the official code (methods-research §3.5).
"""

from __future__ import annotations

import torch

from .adabn import BatchStatsMethod
from .base import Batch, DataRequest, MethodError, Needs, as_list, queries_with_labels
from .blocks.bn import batch_stats, rows_stats
from .blocks.plate_steps import accumulate_per_plate, require_controls, require_plate_pure
from .network import accuracy, masked_cross_entropy
from .registry import register

# Which rows of a context batch give the BN statistics.
STATS_CONTEXTS = {
    "queries+controls": lambda net, batch: batch_stats(net),
    "controls": lambda net, batch: rows_stats(net, batch.is_control),
}


@register("cs-arm-bn")
class CSARMBN(BatchStatsMethod):
    needs = Needs(plate_pure=True, controls=True, multi_plate=True)
    defaults = {"batch_size": 32, "n_controls": 32, "eval_n_controls": 32, "plates_per_step": 4,
                "stats_from": "queries+controls", "schedule": "constant"}
    summary = "ARM-BN with the plate's negative controls in every context: BN statistics over queries ∪ controls."

    def build(self) -> None:
        hp = self.hparams
        if hp["stats_from"] not in STATS_CONTEXTS:
            raise MethodError(f"method {self.name!r}: stats_from must be one of {sorted(STATS_CONTEXTS)}, "
                              f"got {hp['stats_from']!r}")
        needs_controls = hp["stats_from"] == "controls"  # statistics from nothing would be undefined
        minimums = {"plates_per_step": 1, "n_controls": int(needs_controls), "eval_n_controls": int(needs_controls)}
        for key, minimum in minimums.items():
            if hp[key] < minimum:
                raise MethodError(f"method {self.name!r}: {key} must be >= {minimum}, got {hp[key]}")
        super().build()

    def data_request(self) -> DataRequest:
        hp = self.hparams
        return DataRequest(batch_size=hp["batch_size"], plate_pure=True, n_controls=hp["n_controls"],
                           plates_per_step=hp["plates_per_step"], eval_n_controls=hp["eval_n_controls"])

    def context_logits(self, batch: Batch, n_controls: int, hparam: str) -> torch.Tensor:
        """Logits of every row, each BN layer normalised with the context statistics (buffers untouched)."""
        require_plate_pure(batch, self.name)
        require_controls(batch, self.name, minimum=min(n_controls, 1), hparam=hparam)
        with STATS_CONTEXTS[self.hparams["stats_from"]](self.network, batch):
            return self.network(batch.images)

    def plate_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.context_logits(batch, self.hparams["n_controls"], "n_controls")
        mask = queries_with_labels(batch)  # control rows never enter the loss
        loss = masked_cross_entropy(logits, batch.labels, mask)
        return loss, {"train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        opt = self.optimizers[0]
        metrics = accumulate_per_plate(opt, as_list(batches), self.plate_loss)
        self.optimizer_step(opt, None)
        return metrics

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.context_logits(batch, self.hparams["eval_n_controls"], "eval_n_controls")[batch.queries]

    def embed(self, batch: Batch) -> torch.Tensor:
        require_plate_pure(batch, self.name)
        with STATS_CONTEXTS[self.hparams["stats_from"]](self.network, batch):
            return self.network.embed(batch.images)
