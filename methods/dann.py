"""DANN — domain-adversarial training (Ganin et al. 2016, JMLR 17, "Domain-adversarial training of neural networks").

A discriminator D predicts each row's domain (`domain_kind`: an entry of Batch.domains, default
"batch" = RxRx1 experiment / JUMP Metadata_Batch) from the features through a gradient-reversal
layer: L = CE(h(z), y) + w·CE(D(GRL_λ(z)), d). D minimises its loss while the featurizer, receiving
the reversed gradient −λ·w·∂CE_d/∂z, makes domains indistinguishable. Trained on mixed-plate batches
(plate-pure batches would show D one domain per batch). Test: D is dropped; prediction is ERM's
(standard track). Not the transductive variant of the JUMP repo (no unlabelled test images are fed).
The discriminator's shape, w = 0.5 and its 0.1× learning rate follow the JUMP repo (github
ml-jku/cs-arm-bn, config/trainer/dann.yaml, model/gradrev.yaml).

λ schedule (`grl_schedule`). Default "ganin": the paper's λ_p = 2/(1 + exp(−10p)) − 1 over training
progress p ∈ [0, 1], as in the authors' reference loop (github fungtion/DANN train/main.py: at update i
of epoch e, p = (i + e·S)/(E·S) with S updates per epoch and E epochs, so λ = 0 at the very first
update and rises from the second). The paper is this method's reference, hence the default.
"constant": λ = 1 throughout, as WILDS (examples/algorithms/DANN.py) and the JUMP repo use. Both are
scaled by `grl_max`.

Progress here: p = min((e + k/S)/E, 1) before each update, with epoch e of E and S updates per epoch from
`on_epoch_start(epoch, total_epochs, steps_per_epoch)` (the harness knows S exactly from the plan of the
epoch) and k the updates already made in epoch e, as in the reference loop. Without those numbers (a
bare training loop that never calls on_epoch_start) p = 0.

Tested equal to independent implementations of the equations (tests/test_reference_domain.py): λ at
every update against the fungtion/DANN formula, the loss, and the input gradient
−λ·w·∂CE_d/∂x + ∂CE/∂x. Deliberate options: `grl_schedule="constant"` (WILDS / JUMP repo),
`grl_max` ≠ 1 (scales λ; 1 in every reference).
"""

from __future__ import annotations

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
        checks = {"penalty_weight": hp["penalty_weight"] >= 0, "disc_lr_mult": hp["disc_lr_mult"] > 0,
                  "disc_hidden": hp["disc_hidden"] >= 1, "disc_dropout": 0 <= hp["disc_dropout"] < 1,
                  "grl_max": hp["grl_max"] >= 0}
        rules = {"penalty_weight": ">= 0", "disc_lr_mult": "> 0", "disc_hidden": ">= 1", "disc_dropout": "in [0, 1)",
                 "grl_max": ">= 0"}
        for key, ok in checks.items():
            if not ok:
                raise MethodError(f"method {self.name!r}: hyperparameter {key!r} must be {rules[key]}, got {hp[key]!r}")
        self.discriminator = discriminator(self.network.featurizer.out_dim, hp["disc_hidden"],
                                           self.task.num_domains[kind], hp["disc_dropout"])
        self.grl = GradientReversal(0.0)
        self._steps_in_epoch = 0  # k: updates made in the current epoch
        self._update_coeff()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        opt = self.make_optimizer(self.network.parameters())
        opt.add_param_group({"params": list(self.discriminator.parameters()),
                             "lr": self.hparams["lr"] * self.hparams["disc_lr_mult"]})
        return [opt]

    # ---- λ_p schedule ----------------------------------------------------------------------------
    def progress(self) -> float:
        """p = min((e + min(k/S, 1)) / E, 1) before the coming update; 0 while E or S is unknown."""
        if self.total_epochs <= 0 or self.steps_per_epoch <= 0:
            return 0.0
        return min((self.epoch + min(self._steps_in_epoch / self.steps_per_epoch, 1.0)) / self.total_epochs, 1.0)

    def _update_coeff(self) -> None:
        hp = self.hparams
        value = ganin_lambda(self.progress()) if hp["grl_schedule"] == "ganin" else 1.0
        self.grl.coeff = hp["grl_max"] * value

    def on_epoch_start(self, epoch: int, total_epochs: int, steps_per_epoch: int = 0) -> None:
        super().on_epoch_start(epoch, total_epochs, steps_per_epoch)
        self._steps_in_epoch = 0  # the harness always runs (or, after a failure, replays) an epoch from its start
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
