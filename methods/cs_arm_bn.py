"""CS-ARM-BN: control-stabilised ARM-BN (Sanchez-Fernandez et al. 2026; read from github ml-jku/cs-arm-bn).

Every plate-pure batch (L queries) arrives with M−L negative controls of the same plate appended
(is_control=True). Every BN layer normalises with the statistics of queries ∪ controls, so a
batch's mean is (L/M)·μ_Q + (1−L/M)·μ_C: label shift among the queries moves it L/M times less.
The loss is the CE of the queries only; gradients of `plates_per_step` plates (the code's acc_steps)
are accumulated into one optimiser step. At test the same: queries + that plate's controls forwarded
with their pooled statistics (running buffers unused), query logits returned.

Defaults differ from the paper for CPU runs: n_controls = eval_n_controls = 32 (paper 128),
batch_size L = 32 (paper 64), plates_per_step 4 (paper 8); constant learning rate as in the paper.
The paper body was not retrievable; the method is taken from the official code (github ml-jku/cs-arm-bn,
read at commit e091e7e8b70c9bfcb458c2ae5568dab7cc80b586).

`stats_from` picks the statistics (all options apply to training and prediction alike):

* "queries+controls" (default): CS-ARM-BN, the code's ARM_BN trainer with controls in the loader.
* "controls": the code's controls-only ablation, plt/trainer/BEN.py, exactly: BN running buffers reset,
  one train-mode forward of the controls without gradient at the layers' momentum 0.1 (so the buffers
  hold 0.1·μ_C and 0.9 + 0.1·σ²_C, unbiased), then the queries normalised with those buffers in eval
  mode: no gradient through the statistics. (The module's own buffers are restored afterwards; the
  reference overwrites them, but never reads them before refilling.)
* "controls-batch-stats": this project's former "controls" mode, not in the code: every row
  normalised with the exact (biased) batch statistics of the control rows at every layer, gradients
  flowing through them.

Tested equal to independent implementations of the equations (tests/test_reference_domain.py): for
"queries+controls" and "controls", the query logits and the gradients of the query loss w.r.t. the input
images and every parameter; "controls-batch-stats" is tested as the former mode and shown to differ.
"""

from __future__ import annotations

import torch

from .adabn import BatchStatsMethod
from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .blocks.bn import batch_stats, rows_stats, running_stats_from
from .blocks.plate_steps import accumulate_per_plate, require_controls, require_plate_pure
from .network import accuracy, masked_cross_entropy
from .registry import register

BEN_MOMENTUM = 0.1  # the BN momentum of the official code's ResNet (torch's default), used by its BEN trainer

# Which rows of a context batch give the BN statistics, and how (see the module docstring).
STATS_CONTEXTS = {
    "queries+controls": lambda net, batch: batch_stats(net),
    "controls": lambda net, batch: running_stats_from(net, batch.images[batch.is_control], BEN_MOMENTUM),
    "controls-batch-stats": lambda net, batch: rows_stats(net, batch.is_control),
}


@register("cs-arm-bn")
class CSARMBN(BatchStatsMethod):
    needs = Needs(plate_pure=True, controls=True, multi_plate=True)
    defaults = {"batch_size": 32, "n_controls": 32, "eval_n_controls": 32, "plates_per_step": 4,
                "stats_from": "queries+controls", "schedule": "constant"}
    predict_hparams = frozenset({"eval_n_controls"})
    summary = "ARM-BN with the plate's negative controls in every context: BN statistics over queries ∪ controls."

    def build(self) -> None:
        hp = self.hparams
        if hp["stats_from"] not in STATS_CONTEXTS:
            raise MethodError(f"method {self.name!r}: hyperparameter 'stats_from' must be one of "
                              f"{sorted(STATS_CONTEXTS)}, got {hp['stats_from']!r}")
        needs_controls = hp["stats_from"] != "queries+controls"  # statistics from nothing would be undefined
        minimums = {"plates_per_step": 1, "n_controls": int(needs_controls), "eval_n_controls": int(needs_controls)}
        for key, minimum in minimums.items():
            if hp[key] < minimum:
                raise MethodError(f"method {self.name!r}: hyperparameter {key!r} must be >= {minimum} "
                                  f"(stats_from={hp['stats_from']!r}), got {hp[key]!r}")
        super().build()

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
        metrics = accumulate_per_plate(opt, as_list(batches), self.plate_loss, self.backward)
        self.optimizer_step(opt, None)
        return metrics

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.context_logits(batch, self.hparams["eval_n_controls"], "eval_n_controls")[batch.queries]

    def embed(self, batch: Batch) -> torch.Tensor:
        require_plate_pure(batch, self.name)
        with STATS_CONTEXTS[self.hparams["stats_from"]](self.network, batch):
            return self.network.embed(batch.images)
