"""AdvStyle / ASA (Zhang et al., arXiv 2301.12643; methods-research §3.8): adversarially learned style noise.

Layers after the stages in `layers` perturb instance statistics with per-channel scales θ that are
learned *adversarially*: each training step first runs `inner_steps` adversary steps (network
frozen: no parameter gets a gradient and BatchNorm uses batch statistics without touching its
running buffers), each an optimiser step on θ through a gradient-reversal layer — descent on the
reversed gradient is ascent on the cross-entropy. Then one outer step updates the network with the
layers active (each forward picks identity / adversarial / DSU noise uniformly) and θ frozen.

Choices of ours, where the official code does not settle them for this harness: the inner steps
always use the adversarial branch (θ gets no gradient through the other two) and draw fresh noise
per inner step; the adversary optimiser has the main optimiser's type, lr and weight decay (as in
the official trainer) and follows the same lr schedule.

`AdvStyleTTA` ("advstyle+tta", track "tta") trains identically and predicts with each test batch's
own BatchNorm statistics (AdaBN on the plate-pure evaluation batch), running buffers untouched.
"""

from __future__ import annotations

import torch

from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .blocks import bn
from .blocks.inner_loop import frozen_parameters
from .blocks.style import AdvStyleLayer, insertion_channels, parse_insertion_points, pinned
from .erm import ERM
from .network import accuracy, masked_cross_entropy
from .registry import register


@register("advstyle")
class AdvStyle(ERM):
    track = "standard"
    needs = Needs(plate_pure=False)
    defaults = {
        "adv_weight": 1.0,  # gradient-reversal coefficient on θ (the official PACS script used 10)
        "inner_steps": 3,  # adversary steps per training step
        "layers": "stem,res1,res2,res3,res4",  # the official `lc01234` placement
        "eps": 1e-6,
    }
    summary = "Instance-style noise whose scales are learned adversarially through gradient reversal."

    def build(self) -> None:
        super().build()
        hp = self.hparams
        if hp["inner_steps"] < 0 or hp["adv_weight"] < 0:
            raise MethodError(f"method {self.name!r}: inner_steps and adv_weight must be >= 0, "
                              f"got {hp['inner_steps']} and {hp['adv_weight']}")
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
        return [self.make_optimizer(self.network_parameters()), self.make_optimizer(self.adversary_parameters())]

    def adversary_step(self, batch: Batch) -> float:
        """One ascent step on θ (network weights and BN buffers untouched); returns the CE before it."""
        mask = queries_with_labels(batch)
        with pinned(self.style_layers, branch="adv"), frozen_parameters(self.network_parameters()), \
                bn.batch_stats(self.network):
            loss = masked_cross_entropy(self.network(batch.images), batch.labels, mask)
            self.optimizer_step(self.optimizers[1], loss)
        return float(loss.detach())

    def _initialize_theta(self, batch: Batch) -> None:
        """Set θ of every layer on the first step, on every rank at once (θ's init averages over ranks).

        Only needed with inner_steps=0; otherwise the first adversary step does it. Left to the
        random branch choice, ranks would reach the init's all-reduce at different steps.
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
    summary = "AdvStyle training; predicts with the test batch's own BatchNorm statistics (AdaBN)."

    def predict(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.network):
            return self.network(batch.images)[batch.queries]
