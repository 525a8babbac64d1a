"""SimCLR (Chen et al., ICML 2020; v2: NeurIPS 2020), from the official code google-research/simclr (tf2/: run.py
flags, model.py `ProjectionHead`/`SupervisedHead`, objective.py `add_contrastive_loss`).

Two augmented views of every image go through the encoder in one forward, then a projection head; the loss is
NT-Xent (blocks/ssl.py `nt_xent`) with temperature τ (`temperature`, 0.1) over every rank's rows (`negatives`
"global", the official cross-replica concat). The projection head is the code's default (`proj_layers` 3):
layers of width = the encoder's, each Linear (no bias) → BatchNorm (with offset) → ReLU, and a last Linear to
`proj_dim` (128) → BatchNorm without offset; linear weights ~ N(0, 0.01²). The online linear probe reads the
encoder output (`ft_proj_selector` 0), detached, on both views with the labels repeated
(`lineareval_while_pretraining`); predictions are the probe's on the encoder (blocks/probe.py).

Defaults from the code's flags: 100 epochs, 10 warm-up epochs, weight decay 1e-6 (not on biases and BatchNorm),
batch 512. Declared differences: the optimiser is the benchmark's (`optimizer`, Adam at lr 1e-3; the code's
LARS at 0.3 × batch/256 is not available); views for microscopy (blocks/views.py: D4 instead of horizontal flips,
per-channel intensity/contrast jitter with the code's strength-1 values 0.8/0.8 at p 0.8 instead of RGB colour
jitter and greyscale, blur at p 0.5 scaled to the image size); BatchNorm statistics per rank (the code
aggregates them across replicas, `global_bn`). `negatives=local`: negatives from this rank's rows only.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone
from .blocks.probe import PROBE_DEFAULTS, SelfSupervised, common
from .blocks.ssl import nt_xent
from .blocks.views import ViewSpec, jitter_hparams
from .hparams import POSITIVE, Param
from .registry import register


def projection_head(dim: int, layers: int, out_dim: int) -> nn.Sequential:
    """SimCLR's nonlinear ProjectionHead: (layers − 1) × [Linear(dim, dim) → BN → ReLU], Linear(dim, out_dim) →
    BN without offset (its bias frozen at 0). The Linears have no bias (the code drops it under BN)."""
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU()]
    last_bn = nn.BatchNorm1d(out_dim)
    last_bn.bias.requires_grad_(False)
    mods += [nn.Linear(dim, out_dim, bias=False), last_bn]
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
    return nn.Sequential(*mods)


@register("simclr")
class SimCLR(SelfSupervised):
    defaults = {
        **PROBE_DEFAULTS,
        "batch_size": common("batch_size", 512),
        "epochs": common("epochs", 100),
        "warmup_epochs": common("warmup_epochs", 10),
        "weight_decay": common("weight_decay", 1e-6),
        "temperature": Param(0.1, **POSITIVE),
        "proj_layers": Param(3, low=1),
        "proj_dim": Param(128, low=1),
        "negatives": Param("global", choices=("global", "local")),
        "crop_min_scale": Param(0.08, low=0.0, high=1.0, low_open=True),
        **jitter_hparams(brightness=0.8, contrast=0.8),
        "blur_prob": Param(0.5, low=0.0, high=1.0),
    }
    summary = ("SimCLR: NT-Xent between two microscopy views (official code's projection head and loss); "
               "online linear probe on detached features.")

    def build_ssl(self) -> None:
        hp = self.hparams
        self.encoder = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
        self.projector = projection_head(self.encoder.out_dim, hp["proj_layers"], hp["proj_dim"])
        self.view = ViewSpec((hp["crop_min_scale"], 1.0), hp["blur_prob"], hp["jitter_prob"], hp["brightness"],
                             hp["contrast"])

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def ssl_loss(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        n = images.shape[0]
        views = torch.cat([self.view(images, g), self.view(images, g)])  # one forward, as the code's
        features = self.encoder(views)
        z = self.projector(features)
        loss = nt_xent(z[:n], z[n:], self.hparams["temperature"], self.hparams["negatives"] == "global")
        return loss, features.detach(), {}
