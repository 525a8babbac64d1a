"""BYOL (Grill et al., NeurIPS 2020), from the official code google-deepmind/deepmind-research byol/
(byol_experiment.py, utils/networks.py `MLP`, utils/helpers.py `regression_loss`, utils/schedules.py `target_ema`,
configs/byol.py).

An online network (encoder → projector → predictor) predicts, for each of two views, the target network's
projection of the other view: loss = mean over images of ‖p̂₁ − ẑ'₂‖² + ‖p̂₂ − ẑ'₁‖² (each 2 − 2·cos; blocks/ssl.py
`byol_regression`), no gradient into the target. Each view goes through the networks on its own (BatchNorm
statistics per view), the target in training mode too. After each update of the online network, the target
(encoder + projector) moves towards it: ξ ← ξ + (1 − τ)(θ − ξ) with τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 at
update k of K (`target_momentum` τ_base). Projector and predictor: Linear (bias) → BatchNorm → ReLU → Linear (no
bias), hidden 4096, output 256, weights ~ truncated N(0, 1/fan_in). The target is initialised independently of
the online network (`target_init` "independent", as the code). Views: the code's asymmetric pair, blur with
probability 1.0 on the first view and 0.1 on the second. The online linear probe reads the encoder output of the
first view, detached (the code's online classifier); predictions are the probe's on the online encoder.

Defaults: the code's 100-epoch presets (τ_base 0.99, weight decay 1e-6, not on biases and BatchNorm), 10 warm-up
epochs. Declared differences: batch 256 per rank (the paper's 4096 over 512 cores; its batch-size study finds BYOL
stable from 256 to 4096); the benchmark's optimiser (`optimizer`, Adam at lr 1e-3; the code's LARS is not
available); views for microscopy (blocks/views.py: D4 for flips, per-channel intensity/contrast jitter 0.4/0.4 at
p 0.8 for colour jitter and greyscale, no solarisation, blur scaled to the image size); BatchNorm statistics per
rank (the code's are cross-replica); the backbone's own initialisation. `target_init=copy`: the target starts as a
copy of the online network.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .backbones import build_backbone
from .blocks.probe import PROBE_DEFAULTS, SelfSupervised, common
from .blocks.ssl import byol_regression, cosine_schedule, ema_update_
from .blocks.views import ViewSpec, jitter_hparams
from .hparams import Param
from .registry import register

BLUR_PROBS = (1.0, 0.1)  # the code's view 1 and view 2


def byol_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's MLP: Linear(in, hidden) → BatchNorm → ReLU → Linear(hidden, out, no bias); haiku's default init
    (weights ~ N(0, 1/fan_in) truncated at 2σ, biases 0)."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                        nn.Linear(hidden, out_dim, bias=False))
    for m in mlp:
        if isinstance(m, nn.Linear):
            std = 1.0 / math.sqrt(m.in_features)
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return mlp


@register("byol")
class BYOL(SelfSupervised):
    defaults = {
        **PROBE_DEFAULTS,
        "batch_size": common("batch_size", 256),
        "epochs": common("epochs", 100),
        "warmup_epochs": common("warmup_epochs", 10),
        "weight_decay": common("weight_decay", 1e-6),
        "target_momentum": Param(0.99, low=0.0, high=1.0),  # τ_base
        "proj_hidden": Param(4096, low=1),
        "proj_dim": Param(256, low=1),
        "pred_hidden": Param(4096, low=1),
        "target_init": Param("independent", choices=("independent", "copy")),
        "crop_min_scale": Param(0.08, low=0.0, high=1.0, low_open=True),
        **jitter_hparams(brightness=0.4, contrast=0.4),
    }
    summary = ("BYOL: online network predicts an EMA target's projection of the other view (cosine momentum "
               "schedule); online linear probe on detached features.")

    def build_ssl(self) -> None:
        hp = self.hparams
        self.encoder = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
        self.projector = byol_mlp(self.encoder.out_dim, hp["proj_hidden"], hp["proj_dim"])
        self.predictor = byol_mlp(hp["proj_dim"], hp["pred_hidden"], hp["proj_dim"])
        if hp["target_init"] == "copy":
            self.target_encoder, self.target_projector = copy.deepcopy(self.encoder), copy.deepcopy(self.projector)
        else:
            self.target_encoder = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
            self.target_projector = byol_mlp(self.encoder.out_dim, hp["proj_hidden"], hp["proj_dim"])
        for p in self.target_parameters():
            p.requires_grad_(False)  # moved by the EMA only, never by an optimiser
        self.views = tuple(ViewSpec((hp["crop_min_scale"], 1.0), blur, hp["jitter_prob"], hp["brightness"],
                                    hp["contrast"]) for blur in BLUR_PROBS)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def target_momentum(self) -> float:
        """τ of the coming EMA update (update k = global_step of K)."""
        return cosine_schedule(self.hparams["target_momentum"], 1.0, self.global_step(), self.total_steps())

    def ssl_loss(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        views = [view(images, g) for view in self.views]
        features = [self.encoder(v) for v in views]
        predictions = [self.predictor(self.projector(f)) for f in features]
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(v)) for v in views]
        loss = (byol_regression(predictions[0], targets[1]) + byol_regression(predictions[1], targets[0])).mean()
        return loss, features[0].detach(), {"tau": self.target_momentum()}

    def after_ssl_step(self) -> None:
        ema_update_(self.target_parameters(), self.online_parameters(), self.target_momentum())
