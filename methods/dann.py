"""DANN — domain-adversarial training (Ganin et al. 2016; methods-research §3.10).

A discriminator D predicts each row's domain (`domain_kind`: an entry of Batch.domains, default
"batch" = RxRx1 experiment / JUMP Metadata_Batch) from the features through a gradient-reversal
layer: L = CE(h(z), y) + w·CE(D(GRL_λ(z)), d). D minimises its loss while the featurizer, receiving
the reversed gradient, makes domains indistinguishable. λ follows Ganin's schedule
λ_p = 2/(1 + exp(−10p)) − 1 over training progress p (or stays 1 with grl_schedule="constant").
Trained on mixed-plate batches (plate-pure batches would show D one domain per batch). Test: D is
dropped; prediction is ERM's (standard track). Not the transductive variant of the JUMP repo
(no unlabelled test images are fed).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .blocks.grl import GradientReversal
from .erm import ERM
from .grouping import check_domain_kind, domain_ids
from .network import accuracy, masked_cross_entropy
from .registry import register

SCHEDULES = ("ganin", "constant")


def ganin_lambda(progress: float) -> float:
    """2/(1 + exp(−10p)) − 1: 0 at the start of training, → 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def discriminator(in_dim: int, hidden: int, n_domains: int, dropout: float) -> nn.Sequential:
    """The JUMP repo's shape: in → hidden → hidden → domains, BN + ReLU + dropout between."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, n_domains))


@register("dann")
class DANN(ERM):
    track = "standard"
    needs = Needs(plate_pure=False, domain_labels=True)
    defaults = {
        "domain_kind": "batch",
        "penalty_weight": 0.5,  # w (JUMP repo default)
        "disc_lr_mult": 0.1,  # discriminator lr = lr × this (JUMP repo: 1e-4 vs 1e-3)
        "disc_hidden": 64,
        "disc_dropout": 0.2,
        "grl_schedule": "ganin",  # ganin | constant
        "grl_max": 1.0,  # λ is this times the schedule value
    }
    summary = "Gradient-reversal domain discriminator on batch/plate labels; dropped at test."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        kind = check_domain_kind(self, need_count=True)
        if hp["grl_schedule"] not in SCHEDULES:
            raise MethodError(f"method {self.name!r}: hyperparameter 'grl_schedule' must be one of {SCHEDULES}, "
                              f"got {hp['grl_schedule']!r}")
        if hp["penalty_weight"] < 0 or hp["disc_lr_mult"] <= 0 or hp["disc_hidden"] < 1:
            raise MethodError(f"method {self.name!r}: needs penalty_weight >= 0, disc_lr_mult > 0, disc_hidden >= 1")
        self.discriminator = discriminator(self.network.featurizer.out_dim, hp["disc_hidden"],
                                           self.task.num_domains[kind], hp["disc_dropout"])
        self.grl = GradientReversal(0.0)
        self._epoch, self._total_epochs, self._steps_in_epoch, self._steps_per_epoch = 0, 0, 0, 0
        self._update_coeff()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        opt = self.make_optimizer(self.network.parameters())
        opt.add_param_group({"params": list(self.discriminator.parameters()),
                             "lr": self.hparams["lr"] * self.hparams["disc_lr_mult"]})
        return [opt]

    def data_request(self):
        return dataclasses.replace(super().data_request(), domain_kind=self.hparams["domain_kind"])

    # ---- λ_p schedule ----------------------------------------------------------------------------
    def progress(self) -> float:
        if self._total_epochs <= 0:
            return 0.0
        within = min(self._steps_in_epoch / self._steps_per_epoch, 1.0) if self._steps_per_epoch else 0.0
        return min((self._epoch + within) / self._total_epochs, 1.0)

    def _update_coeff(self) -> None:
        hp = self.hparams
        value = ganin_lambda(self.progress()) if hp["grl_schedule"] == "ganin" else 1.0
        self.grl.coeff = hp["grl_max"] * value

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        super().on_epoch_start(epoch, total_epochs)
        if epoch > self._epoch and self._steps_in_epoch:  # a resumed epoch must not count as a short one
            self._steps_per_epoch = self._steps_in_epoch
        if epoch != self._epoch:
            self._steps_in_epoch = 0
        self._epoch, self._total_epochs = epoch, total_epochs
        self._update_coeff()

    def extra_state(self) -> dict:
        return {"epoch": self._epoch, "total_epochs": self._total_epochs, "steps_in_epoch": self._steps_in_epoch,
                "steps_per_epoch": self._steps_per_epoch}

    def load_extra_state(self, state: dict) -> None:
        self._epoch = state.get("epoch", 0)
        self._total_epochs = state.get("total_epochs", 0)
        self._steps_in_epoch = state.get("steps_in_epoch", 0)
        self._steps_per_epoch = state.get("steps_per_epoch", 0)
        self._update_coeff()

    # ---- training --------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss CE + w·CE_domain (through the GRL) and metrics, without stepping."""
        mask = queries_with_labels(batch)
        z = self.network.featurizer(batch.images)
        logits = self.network.classifier(z)
        ce = masked_cross_entropy(logits, batch.labels, mask)
        domains = domain_ids(self, batch, self.hparams["domain_kind"])
        d_logits = self.discriminator(self.grl(z))
        d_loss = masked_cross_entropy(d_logits, domains, batch.queries)
        total = ce + self.hparams["penalty_weight"] * d_loss
        rows = batch.queries
        return total, {"loss": float(total.detach()), "ce": float(ce.detach()), "domain_loss": float(d_loss.detach()),
                       "domain_acc": accuracy(d_logits[rows].detach(), domains[rows]),
                       "train_acc": accuracy(logits[mask].detach(), batch.labels[mask]), "grl_coeff": self.grl.coeff}

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        self._update_coeff()
        total, metrics = self.losses(Batch.concat(as_list(batches)))
        self.optimizer_step(self.optimizers[0], total)
        self._steps_in_epoch += 1
        return metrics
