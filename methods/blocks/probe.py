"""The evaluation protocol shared by the self-supervised methods (simclr, byol, dino): a linear probe.

`SelfSupervised` is the common base of those methods. A subclass builds its networks (`build_ssl`) and computes
its objective on augmented views of the batch's query rows (`ssl_loss`, which also returns the detached features
the probe learns from); the base owns the steps, the probe and prediction:

* `probe=online` (default, the references' online evaluation): every step, one update of the SSL networks on the
  SSL loss, then one update of a linear classifier trained with cross-entropy on the detached encoder features of
  the step's views (labelled, non-control rows only). Labels never reach the encoder: the probe's loss is computed
  on detached features and stepped by its own optimiser.
* `probe=two-stage`: the SSL objective alone for the first `ssl_epochs` epochs (the probe stays at its
  initialisation), then the encoder frozen (eval mode, no gradient) and only the probe trained, on the stream's
  images, for the remaining epochs: the linear evaluation protocol on frozen features.

`predict` = the probe's logits on the evaluation encoder's features (eval mode), `embed` = those features.
Weight decay skips biases and 1-D parameters (BatchNorm), as the references' optimisers do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..base import Batch, Method, MethodError, Needs, as_list
from ..hparams import COMMON_PARAMS, Param
from ..network import accuracy, masked_cross_entropy
from .ssl import weight_decay_groups
from .views import step_generator

PROBE_MODES = ("online", "two-stage")
PROBE_DEFAULTS = {
    "probe": Param("online", choices=PROBE_MODES),
    "ssl_epochs": Param(0, low=0),  # two-stage: epochs of SSL before the probe stage (1 <= ssl_epochs < epochs)
}


def common(name: str, default: Any) -> Param:
    """A common hyperparameter with a method's own default and the common valid values."""
    return replace(COMMON_PARAMS[name], default=default)


class LinearProbe(nn.Linear):
    """A linear classifier with weights ~ N(0, 0.01²) and zero bias (SimCLR's supervised head, DINO's
    LinearClassifier)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__(in_dim, num_classes)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)


@contextlib.contextmanager
def frozen_eval(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode under no_grad inside the block (BatchNorm uses and keeps its running statistics)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class SelfSupervised(Method):
    """Base of the self-supervised methods; subclasses implement `build_ssl`, `ssl_loss` and `encoder_for_eval`,
    and `after_ssl_step` for their EMA updates."""

    track = "standard"
    needs = Needs(plate_pure=False)

    # ---- hooks of a subclass --------------------------------------------------------------------------
    def build_ssl(self) -> None:
        raise NotImplementedError

    def ssl_loss(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(SSL loss, probe features [V·N, D] of V views of the N images, view-major, detached; metrics). The
        reported `ssl_loss` is the loss's value unless the metrics hold another quantity with its gradient."""
        raise NotImplementedError

    def after_ssl_step(self) -> None:
        """Called after each update of the SSL networks (target / teacher EMA)."""

    def encoder_for_eval(self) -> nn.Module:
        """The backbone whose features the probe reads at prediction (and in the frozen probe stage)."""
        raise NotImplementedError

    # ---- construction ---------------------------------------------------------------------------------
    def build(self) -> None:
        hp = self.hparams
        if hp["probe"] == "two-stage" and not 1 <= hp["ssl_epochs"] < hp["epochs"]:
            raise MethodError(f"method {self.name!r}: probe=two-stage needs 1 <= ssl_epochs < epochs "
                              f"({hp['epochs']}), got ssl_epochs={hp['ssl_epochs']}")
        if hp["probe"] == "two-stage" and hp["early_stop_patience"]:
            raise MethodError(f"method {self.name!r}: probe=two-stage cannot stop early (during the SSL epochs the "
                              f"validation metric is the untrained probe's), got early_stop_patience="
                              f"{hp['early_stop_patience']}")
        if hp["probe"] == "online" and hp["ssl_epochs"]:
            raise MethodError(f"method {self.name!r}: 'ssl_epochs' applies to probe=two-stage only, "
                              f"got ssl_epochs={hp['ssl_epochs']} with probe=online")
        self.build_ssl()
        self.probe = LinearProbe(self.encoder_for_eval().out_dim, self.task.num_classes)
        self._steps_in_epoch = 0  # updates made in the current epoch (the harness replays an epoch from its start)

    def _optimizer(self, named) -> torch.optim.Optimizer:
        decay, no_decay = weight_decay_groups(named)
        opt = self.make_optimizer(decay)
        if no_decay:
            opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return opt

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[the SSL networks' optimiser, the probe's]; frozen parameters (target, teacher) are in neither."""
        ssl = [(n, p) for n, p in self.named_parameters() if not n.startswith("probe.")]
        return [self._optimizer(ssl), self._optimizer(self.probe.named_parameters())]

    # ---- schedules ------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, total_epochs: int, steps_per_epoch: int = 0) -> None:
        super().on_epoch_start(epoch, total_epochs, steps_per_epoch)
        self._steps_in_epoch = 0

    def global_step(self) -> int:
        """Updates made before the coming one: epoch·S + k."""
        return self.epoch * self.steps_per_epoch + self._steps_in_epoch

    def total_steps(self) -> int:
        """E·S, or 0 while the harness has not said (a bare loop: every schedule stays at its start)."""
        return self.total_epochs * self.steps_per_epoch

    def phase(self) -> str:
        """"joint" (online probe), "ssl" (two-stage, first stage) or "probe" (two-stage, second stage)."""
        if self.hparams["probe"] == "online":
            return "joint"
        return "ssl" if self.epoch < self.hparams["ssl_epochs"] else "probe"

    # ---- the step -------------------------------------------------------------------------------------
    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        images, labels = batch.images[batch.queries], batch.labels[batch.queries]
        phase, metrics, total = self.phase(), {}, 0.0
        if phase == "probe":
            with frozen_eval(self.encoder_for_eval()):
                features = self.encoder_for_eval()(images)
        else:
            loss, features, metrics = self.ssl_loss(images, step_generator())
            self.optimizer_step(self.optimizers[0], loss)
            self.after_ssl_step()
            total = metrics.setdefault("ssl_loss", float(loss.detach()))
        if phase != "ssl":
            targets = labels.repeat(features.shape[0] // images.shape[0])
            mask = targets >= 0
            logits = self.probe(features.detach()).float()
            probe_loss = masked_cross_entropy(logits, targets, mask)
            self.optimizer_step(self.optimizers[1], probe_loss)
            metrics.update(probe_loss=float(probe_loss.detach()),
                           train_acc=accuracy(logits[mask].detach(), targets[mask]))
            total += metrics["probe_loss"]
        self._steps_in_epoch += 1
        metrics["loss"] = total
        return metrics

    # ---- inference ------------------------------------------------------------------------------------
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.probe(self.encoder_for_eval()(batch.images[batch.queries]))

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.encoder_for_eval()(batch.images)
