"""ABA — Adversarial Bayesian Augmentation (Cheng, Gokhale & Yang, ICCV 2023), as its official code runs it.

Reference: github.com/shengcheng/ABA (commit affb675): `trainer_bnn.py` (`BAL.train_one_epoch`),
`lib/networks/multi_bnn.py`, `lib/networks/bayes_cnn.py`, `run_bal_mnist.sh` (the only published recipe).
The augmentation network g and the two objectives are in blocks/bayes_aug.py. Each training step:

1. clean forward of the task network f (train mode): CE = CE(f(x), y);
2. during the first `pretrain_fraction` of training (the script's `--pre_epoch 5` of 40 epochs): step f on CE
   and stop there;
3. otherwise g is re-initialised (`randomize`: per layer a kernel size out of `kernel_sizes` and a fresh
   posterior) and, with f in eval mode and frozen, `adv_steps` Adam steps (lr `adv_lr`, the reference's
   plain Adam, not on the lr schedule) minimise −CE(f(g(x)), y) − β·KL (`elbo_beta`), each forward drawing
   fresh weights; only the final layer's posterior is optimised (`adv_layers=final`): the reference holds the
   hidden layers in a plain Python list, so its optimiser never sees them and they stay at their fresh draw;
4. two more draws x_g = g(x), x_r = g(x) (the script runs without RandConv, so the second view is another
   sample of the same g), forwarded through f in eval mode (the reference calls `net.eval()` before them);
5. f is stepped on (1 − `consistency_weight`)·CE + `consistency_weight`·L_cl (blocks/bayes_aug.py,
   `resample_weight` w, `adv_temperature` T); the augmented views enter only through L_cl.
Prediction uses f alone (track standard). Defaults are the script's: Adam at lr 1e-4 without weight decay
and without a schedule, 10 adversary steps at lr 5e-6, β = 1 (the script passes `-beta` twice; the last,
1.0, wins), weight 0.75, depth 4, 18 hidden channels, kernel sizes 1/3/5/7, clamped output.
tests/test_advbayes.py checks the layer's sampling, the KL, both objectives, one adversary update and one
full step against the reference's equations written in the test.

Adaptations (none changes the reference's equations): images have C = 5 or 6 standardised channels, so g
maps C → 18 → C (the reference: 3 → 18 → 3 on images normalised to [−1, 1]; the clamp to [0.001, 1] is
kept as written); the warm-up is a fraction of the training (the reference counts 250-iteration epochs);
`batch_size` stays the project's (the digits script: 512); the re-initialisation of g is drawn from a
generator seeded by the run's seed and the step (buffers, checkpointed), so every DDP rank draws the same g,
and the weight noise ε from torch's global generator; rows without a label are left out of every loss; f's
parameters get no gradient in the adversary steps (the reference computes and discards one). The
reference's network has no BatchNorm or dropout, so its train/eval switches only matter here: f is back in
train mode for the next clean forward (the reference leaves it in eval mode until the next epoch).

Declared option (not the default): `adv_layers=all`: the adversary also optimises the hidden layers' posteriors
(what the paper's description suggests).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from .base import Batch, Method, MethodError, Needs, as_list, queries_with_labels
from .blocks.bayes_aug import BayesAugmenter, adversarial_loss, at_least_fp32, consistency_loss
from .blocks.inner_loop import frozen_parameters
from .hparams import COMMON_PARAMS, NON_NEGATIVE, POSITIVE, Param
from .network import Network, accuracy, masked_cross_entropy
from .registry import register

ADV_LAYERS = ("final", "all")
_SEED_STRIDE = 1_000_003


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block (as the reference's `net.eval()`), its modes restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@register("advbayes")
class AdvBayes(Method):
    track = "standard"
    needs = Needs(plate_pure=False)
    defaults = {
        # the reference script's recipe
        "lr": replace(COMMON_PARAMS["lr"], default=1e-4),
        "weight_decay": replace(COMMON_PARAMS["weight_decay"], default=0.0),
        "schedule": replace(COMMON_PARAMS["schedule"], default="constant"),
        "pretrain_fraction": Param(0.125, low=0.0, high=1.0, high_open=True),  # --pre_epoch 5 of 40 epochs
        "adv_steps": Param(10, low=0),
        "adv_lr": Param(5e-6, **POSITIVE),
        "elbo_beta": Param(1.0, **NON_NEGATIVE),
        "consistency_weight": Param(0.75, low=0.0, high=1.0),  # --clw
        "resample_weight": Param(1.0, low=0.0, high=2.0),  # --wr
        "adv_temperature": Param(1.0, **POSITIVE),  # --temp
        "depth": Param(4, low=0),  # --trans_depth
        "hidden_channels": Param(18, low=1),
        "kernel_sizes": "1,3,5,7",
        "clamp_output": True,  # --clamp: g's output clamped to [0.001, 1]
        "adv_layers": Param("final", choices=ADV_LAYERS),  # final (reference) | all
    }
    summary = ("ABA: a Bayesian convolutional augmenter trained adversarially (CE + β·KL ascent) and a "
               "consistency loss between clean and augmented predictions.")

    def build(self) -> None:
        hp = self.hparams
        kernels = self._kernel_sizes(hp["kernel_sizes"])
        self.network = Network(self.backbone_spec, self.task.channels, self.task.num_classes)
        self.augmenter = BayesAugmenter(self.task.channels, hp["hidden_channels"], hp["depth"], kernels,
                                        hp["clamp_output"])
        # The augmenter's draws: seeded by the run (torch's global seed at build) and the draw count.
        self.register_buffer("aug_seed", torch.randint(2**62, (), dtype=torch.long))
        self.register_buffer("aug_draws", torch.zeros((), dtype=torch.long))
        self._epoch_step = 0

    def _kernel_sizes(self, text: str) -> tuple[int, ...]:
        try:
            sizes = tuple(int(s) for s in str(text).split(","))
        except ValueError:
            sizes = ()
        if not sizes or any(k < 1 or k % 2 == 0 for k in sizes) or len(set(sizes)) != len(sizes):
            raise MethodError(f"method {self.name!r}: hyperparameter 'kernel_sizes' must be distinct odd sizes "
                              f"separated by commas (e.g. '1,3,5,7'), got {text!r}")
        return sizes

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # The reference's augmenter optimiser is plain Adam whatever the classifier's.
        return [self.make_optimizer(self.network.parameters()),
                torch.optim.Adam(self.augmenter.parameters(), lr=self.hparams["adv_lr"])]

    def set_lr_factor(self, factor: float) -> None:
        # Only the classifier follows the schedule: the reference discards the augmenter optimiser's scheduler.
        for group in self.optimizers[0].param_groups:
            group["lr"] = group["initial_lr"] * factor

    def on_epoch_start(self, epoch: int, total_epochs: int, steps_per_epoch: int = 0) -> None:
        super().on_epoch_start(epoch, total_epochs, steps_per_epoch)
        self._epoch_step = 0

    def augmenting(self) -> bool:
        """Past the warm-up: training progress (in epochs) at least pretrain_fraction · epochs (always when the
        harness gave no epoch count)."""
        within = self._epoch_step / self.steps_per_epoch if self.steps_per_epoch else 0.0
        return self.epoch + within >= self.hparams["pretrain_fraction"] * self.total_epochs

    def randomize_augmenter(self) -> None:
        seed = (int(self.aug_seed) + _SEED_STRIDE * int(self.aug_draws)) % 2**63
        self.augmenter.randomize(torch.Generator().manual_seed(seed))
        self.aug_draws += 1

    def adversary_steps(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """`adv_steps` Adam steps of g on −CE(f(g(x)), y) − β·KL; f frozen (call with f in eval mode)."""
        hp = self.hparams
        active = self.augmenter.active_parameters(hp["adv_layers"])
        ids = {id(p) for p in active}
        idle = [p for p in self.augmenter.parameters() if id(p) not in ids]
        out: dict[str, float] = {}
        # Idle parameters get no gradient, so Adam (and the all-reduce) skip them, as in the reference.
        with frozen_parameters(self.network.parameters()), frozen_parameters(idle):
            for _ in range(hp["adv_steps"]):
                augmented, kl = self.augmenter(images)
                ce = masked_cross_entropy(at_least_fp32(self.network(augmented)), labels, mask)
                self.optimizer_step(self.optimizers[1], adversarial_loss(ce, kl, hp["elbo_beta"]))
                out = {"adv_ce": float(ce.detach()), "kl": float(kl.detach())}
        return out

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        hp = self.hparams
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        images, labels = batch.images, batch.labels
        augmenting = self.augmenting()
        self._epoch_step += 1
        logits = self.network(images)
        ce = masked_cross_entropy(at_least_fp32(logits), labels, mask)
        metrics = {"ce": float(ce.detach()), "train_acc": accuracy(logits[mask].detach(), labels[mask])}
        loss = ce
        if augmenting:
            self.randomize_augmenter()
            with _eval_mode(self.network):
                metrics.update(self.adversary_steps(images, labels, mask))
                with torch.no_grad():
                    x_g, _ = self.augmenter(images)
                    x_r, _ = self.augmenter(images)
                logits_r, logits_g = self.network(x_r), self.network(x_g)
            cl = consistency_loss(logits[mask], logits_r[mask], logits_g[mask], hp["resample_weight"],
                                  hp["adv_temperature"])
            w = hp["consistency_weight"]
            loss = (1 - w) * ce + w * cl
            metrics["consistency"] = float(cl.detach())
        self.optimizer_step(self.optimizers[0], loss)
        metrics["loss"] = float(loss.detach())
        return metrics

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.network(batch.images[batch.queries])
