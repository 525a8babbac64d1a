"""ABRA — Adversarial Batch Representation Augmentation (Tong, Yao et al., arXiv 2603.05622).

**RECONSTRUCTED.** The paper's equations (4–14) and code are not public; only its abstract and
highlights were read (methods-research §0.2). What the paper states: batch-level channel
statistics of a plate-consistent mini-batch treated as structured uncertainty; a learnable,
bounded perturbation magnitude/direction shared across bio-batches; a min-max scheme (inner
gradient ascent w.r.t. the ABRA parameters only, network frozen); a strict angular margin
(ArcFace); a distribution-alignment (JS) term against collapse; module off at inference; optional
AdaBN test-time adaptation. Everything else here is §3.9's reconstruction, and every uncertain
choice is a hyperparameter:

* statistics at res4 of a plate-pure batch; scales s across plates from moment EMAs; the
  "structured" (a, d) or "simple" (θ) parameterisation — see blocks/batch_style.py [RECON];
* inner loop: `ascent_steps` (K) SGD ascent steps of size `step_size` (η, constant: not on the lr
  schedule) on CE + ArcFace w.r.t. the ABRA parameters only, noise ε fixed across the K steps,
  projection of the magnitudes to [0, a_max] after each step. The backbone runs once per step: the
  ascent reuses the detached res4 feature map and runs only ABRA → pooling → head, so no network
  weight and no BN buffer can change [RECON: the efficiency trick is ours];
* outer loss (network + head, ABRA parameters frozen, fresh ε):
  CE(clean) + CE(pert) + β·[Arc(clean) + Arc(pert)] + λ·JS(softmax(s·cos θ_clean), softmax(s·cos θ_pert)),
  β = `arcface_in_outer` (whether ArcFace enters the outer loss is unknown; default 1);
* ABRA applied to a batch with probability `apply_prob`, decided from the step counter so every
  DDP rank makes the same decision; no perturbation during the first `stats_warmup_steps` steps,
  while the across-plate scales are still being estimated [RECON];
* optional CutMix inside the plate-pure batch with soft targets (`cutmix_prob`; the paper's recipe
  uses CutMix within a bio-batch, its probability is unknown) applied to every CE/ArcFace term;
* cosine classifier head; logits s·cos θ for CE, JS and prediction.

`ABRATTA` ("abra+tta", track "tta") trains identically and predicts with the test batch's own
BatchNorm statistics (AdaBN on the plate-pure evaluation batch), running buffers untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones import build_backbone
from .base import Batch, Method, MethodError, Needs, as_list, queries_with_labels
from .blocks import bn
from .blocks.batch_style import VARIANTS, BatchStyleUncertainty
from .blocks.cutmix import MixedTargets, cutmix_within
from .blocks.divergence import js_divergence_logits
from .blocks.inner_loop import frozen_parameters
from .blocks.margins import CosineHead, arcface_loss
from .blocks.style import frozen_noise
from .network import accuracy
from .registry import register


@register("abra")
class ABRA(Method):
    track = "standard"
    needs = Needs(plate_pure=True)
    defaults = {
        "step_size": 0.1,  # η, inner ascent step on the ABRA parameters
        "ascent_steps": 1,  # K
        "js_weight": 1.0,  # λ
        "arcface_margin": 0.3,  # m
        "arcface_scale": 30.0,  # s (also the scale of the plain logits)
        "arcface_in_outer": 1.0,  # β
        "a_max": 2.0,
        "a_init": 0.5,
        "apply_prob": 1.0,
        "cutmix_prob": 0.0,
        "variant": "structured",  # structured | simple
        "stats_momentum": 0.1,
        "stats_warmup_steps": 10,
        "detach_stats": False,  # stop-grad through the batch μ, σ in the perturbed branch
        "js_stop_grad_clean": False,  # ablation: JS gradient only into the perturbed branch
        "sigma_floor": 1e-3,  # σ' >= sigma_floor · σ
        "eps": 1e-5,
    }
    summary = ("[RECONSTRUCTED] Adversarial perturbation of plate-level res4 feature statistics within a "
               "learned bounded set; cosine head with ArcFace margin and JS consistency.")

    def build(self) -> None:
        hp = self.hparams
        self._validate(hp)
        self.featurizer = build_backbone(self.backbone_spec, self.task.channels)
        self.head = CosineHead(self.featurizer.out_dim, self.task.num_classes)
        self.abra = BatchStyleUncertainty(
            self.featurizer.out_dim, hp["variant"], hp["a_max"], hp["a_init"], hp["stats_momentum"],
            hp["stats_warmup_steps"], hp["eps"], hp["sigma_floor"], hp["detach_stats"])
        # The ascent optimiser is plain SGD with a constant step η (not scheduled, stateless).
        self.ascent_optimizer = torch.optim.SGD(self.abra.parameters(), lr=hp["step_size"])

    def _validate(self, hp) -> None:
        problems = []
        if hp["variant"] not in VARIANTS:
            problems.append(f"'variant' must be one of {VARIANTS}, got {hp['variant']!r}")
        if not 0.0 <= hp["a_init"] <= hp["a_max"]:
            problems.append(f"needs 0 <= a_init <= a_max, got a_init={hp['a_init']}, a_max={hp['a_max']}")
        for key in ("apply_prob", "cutmix_prob"):
            if not 0.0 <= hp[key] <= 1.0:
                problems.append(f"{key!r} must be in [0, 1], got {hp[key]}")
        nonnegative = ("step_size", "ascent_steps", "js_weight", "arcface_margin", "arcface_in_outer",
                       "stats_warmup_steps")
        for key in nonnegative:
            if hp[key] < 0:
                problems.append(f"{key!r} must be >= 0, got {hp[key]}")
        if hp["arcface_scale"] <= 0 or not 0.0 < hp["stats_momentum"] <= 1.0:
            problems.append("'arcface_scale' must be > 0 and 'stats_momentum' in (0, 1]")
        if problems:
            raise MethodError(f"method {self.name!r}: " + "; ".join(problems))

    def network_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.featurizer.parameters(), *self.head.parameters()]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.make_optimizer(self.network_parameters())]

    # ---- losses -----------------------------------------------------------------------------------
    def _ce(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.hparams["arcface_scale"] * cos, labels, reduction="none")

    def _arc(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return arcface_loss(cos, labels, hp["arcface_margin"], hp["arcface_scale"], reduction="none")

    def head_cos(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.featurizer.pool(fmap))

    def adversarial_loss(self, cos: torch.Tensor, targets: MixedTargets, mask: torch.Tensor) -> torch.Tensor:
        """What the inner loop maximises: CE + ArcFace on the perturbed branch."""
        return targets.loss(self._ce, cos, mask) + targets.loss(self._arc, cos, mask)

    # ---- the two loops ----------------------------------------------------------------------------
    def ascend(self, fmap: torch.Tensor, targets: MixedTargets, mask: torch.Tensor) -> float:
        """K ascent steps on the ABRA parameters from the cached res4 map; returns the last loss before a step."""
        fmap = fmap.detach()
        value = float("nan")
        with frozen_parameters(self.network_parameters()), frozen_noise(self.abra):
            for _ in range(self.hparams["ascent_steps"]):
                loss = self.adversarial_loss(self.head_cos(self.abra(fmap)), targets, mask)
                self.optimizer_step(self.ascent_optimizer, -loss)
                self.abra.project()
                value = float(loss.detach())
        return value

    def _perturb_this_step(self) -> bool:
        p = self.hparams["apply_prob"]
        if not self.abra.active or p <= 0.0:
            return False
        if p >= 1.0:
            return True
        # Seeded by the step counter: identical on every rank, reproducible after resume.
        generator = torch.Generator().manual_seed(1_000_003 * int(self.abra.steps_seen) + 17)
        return float(torch.rand((), generator=generator)) < p

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        hp = self.hparams
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        images, targets = batch.images, MixedTargets.hard(batch.labels)
        if hp["cutmix_prob"] > 0 and float(torch.rand(())) < hp["cutmix_prob"]:
            images, targets = cutmix_within(images, batch.labels, mask)
        fmap = self.featurizer.feature_map(images)  # the step's only backbone forward
        self.abra.update_stats(fmap)
        cos_clean = self.head_cos(fmap)
        ce_clean = targets.loss(self._ce, cos_clean, mask)
        loss = ce_clean
        if hp["arcface_in_outer"] > 0:
            loss = loss + hp["arcface_in_outer"] * targets.loss(self._arc, cos_clean, mask)
        metrics = {"ce_clean": float(ce_clean.detach()),
                   "train_acc": accuracy(cos_clean[mask].detach(), batch.labels[mask])}
        if self._perturb_this_step():
            metrics["adv_loss"] = self.ascend(fmap, targets, mask)
            with frozen_parameters(self.abra.parameters()):
                cos_pert = self.head_cos(self.abra(fmap))
            ce_pert = targets.loss(self._ce, cos_pert, mask)
            loss = loss + ce_pert
            if hp["arcface_in_outer"] > 0:
                loss = loss + hp["arcface_in_outer"] * targets.loss(self._arc, cos_pert, mask)
            clean_logits = hp["arcface_scale"] * cos_clean[batch.queries]
            if hp["js_stop_grad_clean"]:
                clean_logits = clean_logits.detach()
            js = js_divergence_logits(clean_logits, hp["arcface_scale"] * cos_pert[batch.queries])
            loss = loss + hp["js_weight"] * js
            metrics.update(ce_pert=float(ce_pert.detach()), js=float(js.detach()))
        self.optimizer_step(self.optimizers[0], loss)
        metrics["loss"] = float(loss.detach())
        if hp["variant"] == "structured":
            metrics.update(a_mu=float(self.abra.a_mu.detach()), a_sigma=float(self.abra.a_sigma.detach()))
        return metrics

    # ---- inference: ABRA off --------------------------------------------------------------------
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.hparams["arcface_scale"] * self.head(self.featurizer(batch.images[batch.queries]))

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.featurizer(batch.images)


@register("abra+tta")
class ABRATTA(ABRA):
    track = "tta"
    summary = "[RECONSTRUCTED] ABRA training; predicts with the test batch's own BatchNorm statistics (AdaBN)."

    def predict(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.featurizer):
            return self.hparams["arcface_scale"] * self.head(self.featurizer(batch.images))[batch.queries]

    def embed(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.featurizer):
            return self.featurizer(batch.images)
