"""GroupDRO (Sagawa et al. 2020; WILDS form; methods-research §3.12).

Groups are the ids of `domain_kind` (default "batch", the WILDS RxRx1 grouping by experiment);
q ∈ Δ^G over all TaskSpec.num_domains[domain_kind] groups starts uniform. Each step: group mean
losses ℓ_g of the groups present; q_g ← q_g·exp(η·ℓ_g) for those groups, renormalised; loss Σ_g q_g ℓ_g
(absent groups contribute 0). Under DDP the ℓ_g used to update q are averaged over all ranks' rows,
so q stays identical everywhere. Test: prediction is ERM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .erm import ERM
from .grouping import check_domain_kind, check_plates_per_step, domain_ids, multi_plate_request
from .network import accuracy
from .registry import register


def group_sums(losses: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sum of `losses` and row count [G]."""
    sums = torch.zeros(n_groups, device=losses.device, dtype=losses.dtype).index_add(0, groups, losses)
    counts = torch.zeros(n_groups, device=losses.device, dtype=losses.dtype).index_add(
        0, groups, torch.ones_like(losses))
    return sums, counts


@register("groupdro")
class GroupDRO(ERM):
    track = "standard"
    needs = Needs(plate_pure=True, multi_plate=True, domain_labels=True)
    defaults = {"batch_size": 16, "domain_kind": "batch", "step_size": 0.01, "plates_per_step": 4}
    summary = "Minimises a worst-group-weighted loss; group weights grow exponentially with group loss."

    def build(self) -> None:
        super().build()
        check_plates_per_step(self)
        kind = check_domain_kind(self, need_count=True)
        if self.hparams["step_size"] < 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'step_size' must be >= 0, "
                              f"got {self.hparams['step_size']}")
        n = self.task.num_domains[kind]
        self.register_buffer("q", torch.full((n,), 1.0 / n))

    def data_request(self):
        return multi_plate_request(self, self.hparams["domain_kind"])

    def robust_loss(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Update q from the present groups' mean losses, then return Σ_g q_g ℓ_g."""
        n = self.q.numel()
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n):
            raise MethodError(f"method {self.name!r}: {self.hparams['domain_kind']} id out of range 0..{n - 1}: "
                              f"{groups.tolist()}")
        losses = F.cross_entropy(logits, labels, reduction="none")
        sums, counts = group_sums(losses, groups, n)
        local = sums / counts.clamp_min(1)
        with torch.no_grad():
            reduced = distributed.allreduce_mean(torch.stack([sums.detach(), counts]))  # both scaled by 1/ranks
            present = reduced[1] > 0
            global_mean = reduced[0] / reduced[1].clamp_min(1e-12)
            q = self.q * torch.where(present, torch.exp(self.hparams["step_size"] * global_mean), 1.0)
            self.q.copy_(q / q.sum())
        return (self.q * local).sum()

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        logits = self.network(batch.images)
        groups = domain_ids(self, batch, self.hparams["domain_kind"])
        loss = self.robust_loss(logits[mask], batch.labels[mask], groups[mask])
        if not bool(mask.any()):
            loss = loss + logits.sum() * 0.0  # keep the graph connected so every rank backpropagates
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "q_max": float(self.q.max()),
                "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}
