"""TVN: a frozen encoder, per-plate control-based whitening of its embeddings, and a linear head.

Encoder: the backbone, frozen and always in eval mode, with the common `weights` hyperparameter's
safetensors file (a public model's, or a run's encoder written by `platebench export-weights`); empty
(the default) means a randomly initialised frozen encoder — a baseline for the pipeline, not a
meaningful feature extractor. The CS-ARM-BN paper uses OpenPhenom (CA-MAE ViT-S/16) embeddings: the
"foundation model + TVN" row is `--backbone vit-small --hparams weights=URI`.

Every batch (training and test) is one plate's context: its queries plus that plate's negative
controls (data_request asks for them). The transform (blocks/tvn.py, CS-ARM-BN-code form) uses the
context's controls; the head sees the transformed query embeddings. tta track: predictions depend
on the test plate's controls.

Global statistics (scaler, PCA, target covariance T) are fitted from training control embeddings
only: every training step adds its contexts' control embeddings to a bank (per rank, at most
`max_fit_controls` rows, first come; not checkpointed), and the statistics are refitted from the
bank gathered over all ranks at steps 1, 2, 4, 8, ... and at the first step of every epoch, so the
head trains on an early, then settling, fit. Before the first fit the statistics are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .backbones import build_backbone
from .base import Batch, Method, MethodError, Needs, as_list, queries_with_labels
from .blocks.plate_steps import require_controls, require_plate_pure
from .blocks.tvn import TVNFit, fit_tvn, tvn_transform
from .network import accuracy, masked_cross_entropy
from .registry import register

_FIT_BUFFERS = ("mean", "scale", "components", "target_sqrt")


def _gather_contexts(contexts: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Every rank's list of [n_i, d] contexts, concatenated in rank order (identical on all ranks)."""
    if distributed.world_size() == 1:
        return contexts
    rows = torch.cat(contexts).to(device)
    sizes = torch.tensor([len(c) for c in contexts], device=device)
    counts = torch.tensor([len(sizes), len(rows)], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(distributed.world_size())]
    dist.all_gather(all_counts, counts)
    max_ctx, max_rows = (int(max(int(c[i]) for c in all_counts)) for i in (0, 1))
    padded_sizes = torch.zeros(max_ctx, dtype=sizes.dtype, device=device)
    padded_sizes[: len(sizes)] = sizes
    padded_rows = torch.zeros(max_rows, rows.shape[1], dtype=rows.dtype, device=device)
    padded_rows[: len(rows)] = rows
    gathered_sizes = [torch.zeros_like(padded_sizes) for _ in all_counts]
    gathered_rows = [torch.zeros_like(padded_rows) for _ in all_counts]
    dist.all_gather(gathered_sizes, padded_sizes)
    dist.all_gather(gathered_rows, padded_rows)
    out = []
    for (n_ctx, n_rows), s, r in zip(all_counts, gathered_sizes, gathered_rows):
        out.extend(torch.split(r[: int(n_rows)], s[: int(n_ctx)].tolist()))
    return out


@register("tvn")
class TVN(Method):
    track = "tta"
    needs = Needs(plate_pure=True, controls=True)
    defaults = {"n_controls": 32, "eval_n_controls": 32, "ridge": 0.5,
                "max_fit_controls": 16384}
    predict_hparams = frozenset({"eval_n_controls"})
    summary = "Frozen encoder; per-plate TVN of embeddings on the plate's controls; linear head."

    def build(self) -> None:
        hp = self.hparams
        for key, minimum in (("n_controls", 2), ("eval_n_controls", 2), ("max_fit_controls", 2)):
            if hp[key] < minimum:
                raise MethodError(f"method 'tvn': {key} must be >= {minimum} (a covariance of controls), got {hp[key]}")
        if hp["max_fit_controls"] < hp["n_controls"]:
            raise MethodError(f"method 'tvn': max_fit_controls ({hp['max_fit_controls']}) must be >= n_controls "
                              f"({hp['n_controls']})")
        if hp["ridge"] <= 0:
            raise MethodError(f"method 'tvn': ridge must be > 0, got {hp['ridge']}")
        self.encoder = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        dim = self.encoder.out_dim
        self.classifier = nn.Linear(dim, self.task.num_classes)
        for name, value in zip(_FIT_BUFFERS, _astuple(TVNFit.identity(dim, hp["ridge"]))):
            self.register_buffer(name, value.float())
        self.register_buffer("fits_done", torch.zeros((), dtype=torch.long))
        self._bank: list[torch.Tensor] = []
        self._bank_rows = 0
        self._steps = 0
        self._refit_pending = False

    def train(self, mode: bool = True) -> TVN:
        super().train(mode)
        self.encoder.eval()  # frozen feature extractor: its BN always uses its own running statistics
        return self

    # ---- global statistics -----------------------------------------------------------------
    @property
    def fit(self) -> TVNFit:
        return TVNFit(*(getattr(self, name).double() for name in _FIT_BUFFERS))

    def refit(self) -> None:
        """Refit scaler/PCA/T from the control bank of every rank (collective under DDP)."""
        contexts = _gather_contexts(self._bank, self.mean.device)
        fit = fit_tvn([c.to(self.mean.device) for c in contexts], self.hparams["ridge"])
        for name, value in zip(_FIT_BUFFERS, _astuple(fit)):
            getattr(self, name).copy_(value)
        self.fits_done += 1

    def on_epoch_start(self, epoch: int, total_epochs: int, steps_per_epoch: int = 0) -> None:
        super().on_epoch_start(epoch, total_epochs, steps_per_epoch)
        self._refit_pending = True

    def _remember_controls(self, controls: torch.Tensor) -> None:
        if self._bank_rows + len(controls) <= self.hparams["max_fit_controls"]:
            self._bank.append(controls.detach().cpu())
            self._bank_rows += len(controls)

    # ---- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def context_embeddings(self, batch: Batch, n_controls_key: str) -> torch.Tensor:
        """Frozen-encoder embeddings of one plate context (checked: one plate, at least 2 controls)."""
        require_plate_pure(batch, self.name)
        require_controls(batch, self.name, minimum=2, hparam=n_controls_key)
        return self.encode(batch.images)

    def transform(self, emb: torch.Tensor, is_control: torch.Tensor) -> torch.Tensor:
        """TVN of one plate context's embeddings with the current global statistics (float64 inside)."""
        return tvn_transform(self.fit, emb, is_control, self.hparams["ridge"]).to(emb.dtype)

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batches = as_list(batches)
        embeddings = [self.context_embeddings(b, "n_controls") for b in batches]
        for batch, emb in zip(batches, embeddings):
            self._remember_controls(emb[batch.is_control])
        self._steps += 1
        if self._refit_pending or self._steps & (self._steps - 1) == 0:  # powers of two
            self.refit()
            self._refit_pending = False
        feats = torch.cat([self.transform(emb, b.is_control) for b, emb in zip(batches, embeddings)])
        meta = Batch.concat(batches)
        mask = queries_with_labels(meta)
        logits = self.classifier(feats)
        loss = masked_cross_entropy(logits, meta.labels, mask)
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "train_acc": accuracy(logits[mask].detach(), meta.labels[mask])}

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.classifier(self.embed(batch)[batch.queries])

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.transform(self.context_embeddings(batch, "eval_n_controls"), batch.is_control)

    def extra_state(self) -> dict:
        return {"steps": self._steps}

    def load_extra_state(self, state: dict) -> None:
        self._steps = int(state.get("steps", 0))


def _astuple(fit: TVNFit) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(fit, name) for name in _FIT_BUFFERS)
