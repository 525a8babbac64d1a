"""AdvStyle / ASA (Zhang et al., arXiv 2301.12643): adversarially learned style noise.

Reference: paper "Adversarial Style Augmentation for Domain Generalization"; code
github.com/YBZh/AdvStyle (layer `Dassl.pytorch/dassl/modeling/ops/advstyle.py`, trainer
`imcls/trainers/vanilla2_advstyle.py`). Layers after the stages in `layers` perturb instance statistics;
each training forward picks, per layer, identity / adversarial / DSU noise uniformly (`AdvStyleLayer`).
The adversarial branch scales the noise with per-channel θ learned *adversarially*: each training step
first runs `inner_steps` adversary steps, each an optimiser step on θ through a gradient-reversal layer
(descent on the reversed gradient is ascent on the cross-entropy), then one outer step updates the
network. As in the reference trainer, the inner steps draw each layer's branch at random like any training
forward, and BatchNorm stays in train mode (batch statistics, running buffers updated) during them; the
network's weights are not changed by them. Instance statistics use the unbiased variance over (h, w).
tests/test_reference_style.py checks the layer (each branch: output, input gradient, θ gradient) and the
inner step against the reference equations.

Deliberate options (not the default), the project's earlier behaviour:
* `inner_branch="adv"`: every layer is on the adversarial branch during the inner steps (θ of every layer
  gets a gradient at every inner step; the reference picks the branch at random).
* `freeze_bn_in_inner=True`: BatchNorm uses batch statistics without touching its running buffers during
  the inner steps, so they leave every network weight and buffer bit-identical.
* `adv_optimizer="main"`: the adversary optimiser copies the main one's settings, under `optimizer=sgd` its
  momentum and weight decay too (the reference: plain SGD, see below; no difference under adam/adamw).

Declared differences: (1) θ is initialised by one extra no-grad forward on the first step with every layer
on the adversarial branch (BatchNorm on batch statistics, buffers untouched), so that every rank reaches
θ's all-reduce together; the reference sets each layer's θ at that layer's first adversarial forward.
(2) A θ whose layer took another branch in an inner step has no gradient and is not stepped, as torch ≥ 2
runs the reference trainer (its `zero_grad` drops gradients). On several ranks the gradient all-reduce gives
every θ a gradient (zero where no rank used it): under the plain SGD adversary that leaves θ unchanged;
under adam it still steps θ by Adam's moments and weight decay (as torch 1.x would run the reference).
(3) The network's parameters get no gradient in the inner steps (the reference computes and discards one).

The adversary optimiser is built as the reference's `build_optimizer_advstle` (`dassl/optim/optimizer.py`)
builds it: the main optimiser's type and lr, following the same lr schedule; under `optimizer=sgd` (every
official config) plain SGD, momentum 0 and weight decay 0, so one adversary step is θ ← θ − lr·∇θ and a zero
gradient leaves θ where it is; under adam the main optimiser's weight decay (and betas), as the reference.
The reference builds no adamw adversary (its builder fails there); here adamw gets the main settings, as adam.

`AdvStyleTTA` ("advstyle+tta", track "tta") trains identically and predicts with each test batch's
own BatchNorm statistics (AdaBN on the plate-pure evaluation batch), running buffers untouched.
"""

from __future__ import annotations

import contextlib

import torch

from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .blocks import bn
from .blocks.inner_loop import frozen_parameters
from .blocks.style import AdvStyleLayer, insertion_channels, parse_insertion_points, pinned
from .erm import ERM
from .hparams import Param
from .network import accuracy, masked_cross_entropy
from .registry import register

INNER_BRANCHES = ("random", "adv")
ADV_OPTIMIZERS = ("reference", "main")


@register("advstyle")
class AdvStyle(ERM):
    track = "standard"
    needs = Needs(plate_pure=False)
    defaults = {
        "adv_weight": 1.0,  # gradient-reversal coefficient on θ (the official PACS script used 10)
        "inner_steps": 3,  # adversary steps per training step
        "layers": "stem,res1,res2,res3,res4",  # the official `lc01234` placement
        "eps": 1e-6,
        "inner_branch": "random",  # random (reference: each layer picks its branch) | adv (always adversarial)
        "freeze_bn_in_inner": False,  # True: inner steps leave BN running buffers untouched (reference: updated)
        # reference: plain SGD when optimizer=sgd (see the module doc) | main: the main optimiser's settings
        "adv_optimizer": Param("reference", choices=ADV_OPTIMIZERS),
    }
    summary = "Instance-style noise whose scales are learned adversarially through gradient reversal."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        if hp["inner_steps"] < 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'inner_steps' must be >= 0, "
                              f"got {hp['inner_steps']}")
        if hp["adv_weight"] < 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'adv_weight' must be >= 0, "
                              f"got {hp['adv_weight']}")
        if not hp["eps"] > 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'eps' must be > 0, got {hp['eps']}")
        if hp["inner_branch"] not in INNER_BRANCHES:
            raise MethodError(f"method {self.name!r}: hyperparameter 'inner_branch' must be one of "
                              f"{INNER_BRANCHES}, got {hp['inner_branch']!r}")
        featurizer = self.network.featurizer
        channels = insertion_channels(featurizer, self.task.channels)
        points = parse_insertion_points(self.name, hp["layers"])
        self.style_layers = [AdvStyleLayer(channels[p], hp["adv_weight"], hp["eps"]) for p in points]
        for point, layer in zip(points, self.style_layers):
            featurizer.set_insert(point, layer)

    def adversary_parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.style_layers for p in layer.parameters()]

    def network_parameters(self) -> list[torch.nn.Parameter]:
        adversary = {id(p) for p in self.adversary_parameters()}
        return [p for p in self.network.parameters() if id(p) not in adversary]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.make_optimizer(self.network_parameters()), self.make_adversary_optimizer()]

    def make_adversary_optimizer(self) -> torch.optim.Optimizer:
        """θ's optimiser, as the reference builds it: under SGD no momentum and no weight decay (its comment:
        "do not use momentum when find adversarial direction"); otherwise the main optimiser's settings."""
        hp = self.hparams
        if hp["optimizer"] == "sgd" and hp["adv_optimizer"] == "reference":
            return torch.optim.SGD(self.adversary_parameters(), lr=hp["lr"], momentum=0.0, weight_decay=0.0)
        return self.make_optimizer(self.adversary_parameters())

    def adversary_step(self, batch: Batch) -> float:
        """One ascent step on θ (network weights untouched); returns the CE before it.

        BN buffers are updated as by any train-mode forward unless `freeze_bn_in_inner`.
        """
        hp = self.hparams
        mask = queries_with_labels(batch)
        branch = {"branch": "adv"} if hp["inner_branch"] == "adv" else {}
        bn_context = bn.batch_stats(self.network) if hp["freeze_bn_in_inner"] else contextlib.nullcontext()
        optimizer = self.optimizers[1]
        with pinned(self.style_layers, **branch), frozen_parameters(self.network_parameters()), bn_context:
            loss = masked_cross_entropy(self.network(batch.images), batch.labels, mask)
            optimizer.zero_grad(set_to_none=True)
            # With random branches no layer may be adversarial: then nothing has a gradient. The step (and its
            # all-reduce) still runs, so every rank takes part in it whatever its branches.
            if loss.requires_grad:
                self.backward(loss)
            self.optimizer_step(optimizer, None)
        return float(loss.detach())

    def _initialize_theta(self, batch: Batch) -> None:
        """Set θ of every layer on the first step, on every rank at once (θ's init averages over ranks).

        Left to the random branch choice (as in the reference), ranks would reach the init's all-reduce at
        different steps. An extra forward, so BN uses batch statistics and leaves its buffers alone.
        """
        if all(bool(layer.initialized) for layer in self.style_layers):
            return
        with pinned(self.style_layers, branch="adv"), bn.batch_stats(self.network), torch.no_grad():
            self.network(batch.images)

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        self._initialize_theta(batch)
        adv_losses = [self.adversary_step(batch) for _ in range(self.hparams["inner_steps"])]
        mask = queries_with_labels(batch)
        with frozen_parameters(self.adversary_parameters()):
            logits = self.network(batch.images)
            loss = masked_cross_entropy(logits, batch.labels, mask)
            self.optimizer_step(self.optimizers[0], loss)
        out = {"loss": float(loss.detach()), "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}
        if adv_losses:
            out["adv_loss"] = adv_losses[-1]
        return out


@register("advstyle+tta")
class AdvStyleTTA(AdvStyle):
    track = "tta"
    trains_as = "advstyle"
    summary = "AdvStyle training; predicts with the test batch's own BatchNorm statistics (AdaBN)."

    def build(self) -> None:
        super().build()
        bn.require_batchnorm(self.network.featurizer, self.name, self.backbone_spec)

    def predict(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.network):
            return self.network(batch.images)[batch.queries]
