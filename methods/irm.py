"""IRM — IRMv1 (Arjovsky et al. 2019), WILDS form (examples/algorithms/IRM.py).

Groups are the ids of `domain_kind` (default "batch", as WILDS RxRx1). For each group e present:
R_e = mean CE, and penalty_e = (∂R_e¹/∂w)·(∂R_e²/∂w) at w = 1, where R_e¹, R_e² are the CE of w·logits
on the group's even and odd rows (an unbiased estimate of (∂R_e/∂w)²). L = mean_e R_e + λ_t·mean_e
penalty_e with λ_t = 1 for the first `anneal_steps` updates and `penalty_weight` afterwards; the
optimiser state is reset at update number `anneal_steps` (before it), as WILDS does. The update
counter is checkpointed (extra_state). Test: prediction is ERM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .erm import ERM
from .grouping import check_domain_kind, check_plates_per_step, domain_ids
from .network import accuracy
from .precision import full_precision
from .registry import register


@full_precision  # the DomainBed code differentiates w.r.t. a float32 scale
def irm_penalty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Product of the gradients w.r.t. a dummy scale w=1 of the even-row and odd-row CE (differentiable)."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    loss_even = F.cross_entropy(logits[0::2] * scale, labels[0::2])
    loss_odd = F.cross_entropy(logits[1::2] * scale, labels[1::2])
    grad_even = torch.autograd.grad(loss_even, [scale], create_graph=True)[0]
    grad_odd = torch.autograd.grad(loss_odd, [scale], create_graph=True)[0]
    return grad_even * grad_odd


def irm_objective(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                  penalty_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, mean group risk, mean group penalty); groups with < 2 rows add risk but no penalty."""
    risks, penalties = [], []
    for g in torch.unique(groups):
        rows = groups == g
        risks.append(F.cross_entropy(logits[rows], labels[rows]))
        if int(rows.sum()) >= 2:
            penalties.append(irm_penalty(logits[rows], labels[rows]))
    if not risks:
        zero = logits.sum() * 0.0
        return zero, zero, zero
    risk = torch.stack(risks).mean()
    penalty = torch.stack(penalties).sum() / len(risks) if penalties else risk * 0.0
    return risk + penalty_weight * penalty, risk, penalty


@register("irm")
class IRM(ERM):
    track = "standard"
    needs = Needs(plate_pure=True, multi_plate=True, domain_labels=True)
    defaults = {"batch_size": 16, "domain_kind": "batch", "penalty_weight": 1.0, "anneal_steps": 500,
                "plates_per_step": 4}
    summary = "Invariant risk minimisation (IRMv1 penalty per group, annealed, optimiser reset at the switch)."

    def build(self) -> None:
        super().build()
        check_plates_per_step(self)
        check_domain_kind(self, need_count=False)
        if self.hparams["anneal_steps"] < 0 or self.hparams["penalty_weight"] < 0:
            raise MethodError(f"method {self.name!r}: anneal_steps and penalty_weight must be >= 0")
        self.update_count = 0


    def current_penalty_weight(self) -> float:
        hp = self.hparams
        return hp["penalty_weight"] if self.update_count >= hp["anneal_steps"] else 1.0

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        logits = self.network(batch.images)
        groups = domain_ids(self, batch, self.hparams["domain_kind"])
        weight = self.current_penalty_weight()
        loss, risk, penalty = irm_objective(logits[mask], batch.labels[mask], groups[mask], weight)
        if not bool(mask.any()):
            loss = loss + logits.sum() * 0.0
        optimizer = self.optimizers[0]
        if self.update_count == self.hparams["anneal_steps"]:
            optimizer.state.clear()  # a fresh optimiser for the new penalty scale (WILDS re-creates it)
        self.optimizer_step(optimizer, loss)
        self.update_count += 1
        return {"loss": float(loss.detach()), "risk": float(risk.detach()), "penalty": float(penalty.detach()),
                "penalty_weight": weight, "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}

    def extra_state(self) -> dict:
        return {"update_count": self.update_count}

    def load_extra_state(self, state: dict) -> None:
        self.update_count = int(state.get("update_count", 0))
