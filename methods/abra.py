"""ABRA — Adversarial Batch Representation Augmentation (Tong, Yao et al., arXiv 2603.05622; no public code).

A plate-pure mini-batch has one "bio-batch style": the channel statistics (μ, σ) of its feature map. ABRA
perturbs them in the worst-case direction within a learned, bounded set (inner ascent on the ABRA parameters,
network frozen) and trains the network on the clean and the perturbed features (outer descent, ABRA frozen).

The paper's choices (defaults here):
* recipe: Adam (`optimizer`), batch 128 (`batch_size`: one plate-pure batch), 100 epochs (`epochs`), linear
  warm-up over the first 10 (`warmup_epochs`); flips, 90° rotations and random crop-and-resize (`augment`
  "flip-rot90-crop"); self-standardised inputs (the stream's); CutMix between two images of the same bio-batch
  with area-interpolated labels (`cutmix_prob`): partners are rows of the plate-pure batch, and every CE/ArcFace
  term uses the soft target λ·y_i + (1 − λ)·y_j, λ the kept area fraction (blocks/cutmix.py);
* the perturbed statistics are those of the plate-pure batch after res4, the paper's best placement (`insert_at`);
* a learnable perturbation magnitude and direction shared across bio-batches, bounded; min-max training:
  `ascent_steps` (K) ascent steps of size `step_size` (η) on CE + ArcFace (angular margin `arcface_margin` m,
  scale `arcface_scale` s) w.r.t. the ABRA parameters only, network frozen; then the outer loss
  CE(clean) + CE(pert) + λ·JS(p_clean, p_pert) (`js_weight` λ, the alignment term against collapse), plus
  β·[Arc(clean) + Arc(pert)] (β: ours, below). The default values of K, η, m, s, λ and `a_max` are ours, the
  centres of the published search space (tune_spaces/abra.yaml);
* module off at inference; AdaBN optional (`abra+tta`).
The paper does not state the CutMix probability. Default 1.0 (every step): the CutMix authors' value for their
ImageNet ResNet-50 recipe (clovaai/CutMix-PyTorch README; 0.5 is their CIFAR value), the setting nearest ABRA's
(ResNet-50, large images); λ ~ Beta(1, 1) as in CutMix. After the warm-up the lr follows `schedule` (cosine).

Ours. Each is a hyperparameter; its default is off unless the method needs the element to be defined, and then
it is the minimal form:
* `stats_scale` "batch" (minimal): δ is in units s, the spread over the current batch's images of their
  per-image channel statistics (DSU's Σ); a bound on a magnitude needs units. "plates": EMAs (`stats_momentum`)
  of the std of the batch-level statistics across plates, identical on every DDP rank.
* `stats_warmup_steps` 0 (off): no perturbation during the first N steps (lets the "plates" EMAs settle).
* `project` True (minimal form of "bounded"): magnitudes projected onto [0, `a_max`] after each ascent step;
  False: unconstrained (an ablation: the perturbation is then unbounded).
* `direction_norm` "unit" (off): the direction is d/‖d‖ (a unit vector, bounded); "sqrt_c": √C·d/‖d‖, the norm
  of the noise ε — with "unit" the learned direction is 1/√C of the noise.
* `sigma_floor` 0.0 (minimal: a std is not negative): σ' = max(σ + δ_σ, sigma_floor·σ).
* the form δ = a·s⊙(ε + d̂), noise ε ~ N(0, I) fixed across the K steps (`variant` "structured"), or δ = s⊙θ⊙ε
  with per-channel θ ("simple"); initial magnitude `a_init` (blocks/batch_style.py);
* `arcface_in_outer` β = 1 (0: ArcFace in the inner loss only); `apply_prob` 1 (every step perturbed; p < 1
  decided from the step counter, the same on every DDP rank); ablations `detach_stats`, `js_stop_grad_clean` off;
* a cosine head (ArcFace needs cosine logits; s·cos θ for CE, JS and prediction); plain-SGD ascent with a
  constant η (not on the lr schedule); the ascent reuses the step's detached feature map at the insertion point,
  so the backbone up to it runs once per step. Away from res4 the layers after the insertion point run on
  every branch; the perturbed ones normalise with batch statistics and leave BN buffers to the clean branch.

`ABRATTA` ("abra+tta", track "tta") trains identically and predicts with the test batch's own BatchNorm
statistics (AdaBN on the plate-pure evaluation batch), running buffers untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones import INSERTION_POINTS, build_backbone
from .base import Batch, Method, MethodError, Needs, as_list, queries_with_labels
from .blocks import bn
from .blocks.batch_style import DIRECTIONS, SCALES, VARIANTS, BatchStyleUncertainty
from .blocks.cutmix import MixedTargets, cutmix_within
from .blocks.divergence import js_divergence_logits
from .blocks.inner_loop import frozen_parameters
from .blocks.margins import CosineHead, arcface_loss
from .blocks.style import frozen_noise, insertion_channels
from .network import accuracy
from .registry import register


@register("abra")
class ABRA(Method):
    track = "standard"
    needs = Needs(plate_pure=True)
    defaults = {
        # the paper's training recipe
        "optimizer": "adam",
        "batch_size": 128,
        "epochs": 100,
        "warmup_epochs": 10,
        "augment": "flip-rot90-crop",
        "cutmix_prob": 1.0,  # not stated by the paper (docstring)
        "insert_at": "res4",
        # the paper's quantities (default values: ours, the centres of the search space)
        "step_size": 0.1,  # η, inner ascent step on the ABRA parameters
        "ascent_steps": 1,  # K
        "js_weight": 1.0,  # λ
        "arcface_margin": 0.3,  # m
        "arcface_scale": 30.0,  # s (also the scale of the plain logits)
        "a_max": 2.0,  # the bound of the magnitudes
        # ours (docstring): each off, or the minimal form where the method needs it
        "arcface_in_outer": 1.0,  # β
        "a_init": 0.5,
        "apply_prob": 1.0,
        "variant": "structured",  # structured | simple
        "stats_scale": "batch",  # batch | plates
        "stats_momentum": 0.1,  # stats_scale "plates" only
        "stats_warmup_steps": 0,
        "project": True,
        "direction_norm": "unit",  # unit | sqrt_c
        "sigma_floor": 0.0,  # σ' >= sigma_floor · σ
        "detach_stats": False,  # ablation: stop-grad through the batch μ, σ in the perturbed branch
        "js_stop_grad_clean": False,  # ablation: JS gradient only into the perturbed branch
        "eps": 1e-5,
    }
    summary = ("Adversarial perturbation of plate-level res4 feature statistics within a learned bounded set; "
               "cosine head with ArcFace margin and JS consistency; the paper's recipe with within-plate CutMix.")

    def build(self) -> None:
        hp = self.hparams
        self._validate(hp)
        self.featurizer = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
        self.head = CosineHead(self.featurizer.out_dim, self.task.num_classes)
        channels = insertion_channels(self.featurizer, self.task.channels)[hp["insert_at"]]
        self.abra = BatchStyleUncertainty(
            channels, variant=hp["variant"], a_init=hp["a_init"], a_max=hp["a_max"], scale=hp["stats_scale"],
            momentum=hp["stats_momentum"], warmup_steps=hp["stats_warmup_steps"], direction=hp["direction_norm"],
            sigma_floor=hp["sigma_floor"], eps=hp["eps"], detach_stats=hp["detach_stats"])
        # The ascent optimiser is plain SGD with a constant step η (not scheduled, stateless).
        self.ascent_optimizer = torch.optim.SGD(self.abra.parameters(), lr=hp["step_size"])

    def _validate(self, hp) -> None:
        problems = []
        for key, allowed in (("variant", VARIANTS), ("stats_scale", SCALES), ("direction_norm", DIRECTIONS),
                             ("insert_at", INSERTION_POINTS)):
            if hp[key] not in allowed:
                problems.append(f"{key!r} must be one of {allowed}, got {hp[key]!r}")
        if hp["a_init"] < 0 or (hp["project"] and hp["a_init"] > hp["a_max"]):
            problems.append(f"needs 0 <= a_init (<= a_max with project), got a_init={hp['a_init']}, "
                            f"a_max={hp['a_max']}")
        for key in ("apply_prob", "cutmix_prob"):
            if not 0.0 <= hp[key] <= 1.0:
                problems.append(f"{key!r} must be in [0, 1], got {hp[key]}")
        if not 0.0 <= hp["sigma_floor"] < 1.0:
            problems.append(f"'sigma_floor' must be in [0, 1), got {hp['sigma_floor']}")
        if not 0.0 < hp["stats_momentum"] <= 1.0:
            problems.append(f"'stats_momentum' must be in (0, 1], got {hp['stats_momentum']}")
        for key in ("step_size", "ascent_steps", "js_weight", "arcface_margin", "arcface_in_outer", "a_max",
                    "stats_warmup_steps"):
            if hp[key] < 0:
                problems.append(f"{key!r} must be >= 0, got {hp[key]}")
        for key in ("arcface_scale", "eps"):
            if hp[key] <= 0:
                problems.append(f"{key!r} must be > 0, got {hp[key]}")
        if problems:
            raise MethodError(f"method {self.name!r}: " + "; ".join(problems))

    def network_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.featurizer.parameters(), *self.head.parameters()]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.make_optimizer(self.network_parameters())]

    # ---- the network around the insertion point ---------------------------------------------------
    def _stages(self) -> tuple[list, list]:
        """The backbone's stages up to and including `insert_at`, and those after it (none at res4)."""
        stages = self.featurizer.stages()
        cut = [point for point, _ in stages].index(self.hparams["insert_at"]) + 1
        return stages[:cut], stages[cut:]

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The feature map at the insertion point (the step's only forward through these layers)."""
        for _, stage in self._stages()[0]:
            images = stage(images)
        return images

    def head_cos(self, fmap: torch.Tensor) -> torch.Tensor:
        """cos θ from a feature map at the insertion point: the remaining stages → pooling → cosine head."""
        for _, stage in self._stages()[1]:
            fmap = stage(fmap)
        return self.head(self.featurizer.pool(fmap))

    def perturbed_cos(self, fmap: torch.Tensor) -> torch.Tensor:
        """The perturbed branch; BN after the insertion point uses batch statistics and keeps its buffers."""
        with bn.batch_stats(self.featurizer):
            return self.head_cos(self.abra(fmap))

    # ---- losses -----------------------------------------------------------------------------------
    def _ce(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.hparams["arcface_scale"] * cos, labels, reduction="none")

    def _arc(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return arcface_loss(cos, labels, hp["arcface_margin"], hp["arcface_scale"], reduction="none")

    def adversarial_loss(self, cos: torch.Tensor, targets: MixedTargets, mask: torch.Tensor) -> torch.Tensor:
        """What the inner loop maximises: CE + ArcFace on the perturbed branch."""
        return targets.loss(self._ce, cos, mask) + targets.loss(self._arc, cos, mask)

    # ---- the two loops ----------------------------------------------------------------------------
    def ascend(self, fmap: torch.Tensor, targets: MixedTargets, mask: torch.Tensor) -> float:
        """K ascent steps on the ABRA parameters from the cached feature map; returns the last loss before a step."""
        fmap = fmap.detach()
        value = float("nan")
        with frozen_parameters(self.network_parameters()), frozen_noise(self.abra):
            for _ in range(self.hparams["ascent_steps"]):
                loss = self.adversarial_loss(self.perturbed_cos(fmap), targets, mask)
                self.optimizer_step(self.ascent_optimizer, -loss)
                if self.hparams["project"]:
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
        fmap = self.trunk(images)
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
                cos_pert = self.perturbed_cos(fmap)
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
    trains_as = "abra"
    summary = "ABRA training; predicts with the test batch's own BatchNorm statistics (AdaBN)."

    def build(self) -> None:
        super().build()
        bn.require_batchnorm(self.featurizer, self.name, self.backbone_spec)

    def predict(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.featurizer):
            return self.hparams["arcface_scale"] * self.head(self.featurizer(batch.images))[batch.queries]

    def embed(self, batch: Batch) -> torch.Tensor:
        with bn.batch_stats(self.featurizer):
            return self.featurizer(batch.images)
