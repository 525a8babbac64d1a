"""GroupDRO (Sagawa et al. 2020, "Distributionally robust neural networks for group shifts").

Reference: the WILDS form, github p-lambda/wilds examples/algorithms/groupDRO.py (read at commit
0b18b1ed2b0504c1170c0de0a6ec3ffaab62f9d5). Groups are the ids of `domain_kind` (default "batch", the
WILDS RxRx1 grouping by experiment). WILDS keeps group weights q over the *training* groups T only:
q₀ = 1/|T| on T and 0 on every validation/test group; each step, with ℓ_g the mean loss of group g in
the batch (0 for an absent group), q ← q·exp(η·ℓ) renormalised, and the loss is Σ_g q_g ℓ_g with the
updated q (q is a constant for the backward pass).

A method only sees training batches, so T is learnt as the set of groups *seen so far* in training
batches (`q_groups="seen"`, the default). The state is a log-weight per group id, a_g = η·Σ_t ℓ_{g,t}
(shifted by a common constant for range), and q = softmax of a over the seen groups, 0 elsewhere. Since
WILDS's q is ∝ exp(a_g) on T, this equals WILDS's q exactly from the step at which every training group
has been seen (within the first epoch); before that it is WILDS's q renormalised over the groups seen
so far (the same for every seen group, so the loss is WILDS's × Σ_T exp(a) / Σ_seen exp(a) ≥ 1). Groups
never present in training (validation/test ids) keep weight 0 throughout, as in WILDS.

Tested equal to an independent implementation of the WILDS update (tests/test_reference_domain.py):
q after every step, the loss, and its gradient w.r.t. the logits. Deliberate option:
`q_groups="all"` is this project's former behaviour: q uniform over every group id of the manifest
(TaskSpec.num_domains[domain_kind], validation and test groups included), so the loss is scaled by the
training groups' share of q.

Under DDP the ℓ_g (and presence) used to update q are averaged over all ranks' rows, so q stays
identical everywhere. Test: prediction is ERM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .base import Batch, MethodError, Needs, as_list, queries_with_labels
from .erm import ERM
from .grouping import check_domain_kind, check_plates_per_step, domain_ids
from .network import accuracy
from .registry import register

Q_GROUPS = {
    "seen": "q over the groups present in training batches so far (WILDS: q over the training groups)",
    "all": "q over every group id of the manifest, validation/test included (former behaviour, not WILDS)",
}


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
    defaults = {"batch_size": 16, "domain_kind": "batch", "step_size": 0.01, "plates_per_step": 4,
                "q_groups": "seen"}  # seen | all (see Q_GROUPS)
    summary = "Minimises a worst-group-weighted loss; group weights grow exponentially with group loss."

    def build(self) -> None:
        super().build()
        check_plates_per_step(self)
        kind = check_domain_kind(self, need_count=True)
        hp = self.hparams
        if hp["step_size"] < 0:
            raise MethodError(f"method {self.name!r}: hyperparameter 'step_size' must be >= 0, got {hp['step_size']}")
        if hp["q_groups"] not in Q_GROUPS:
            raise MethodError(f"method {self.name!r}: hyperparameter 'q_groups' must be one of {sorted(Q_GROUPS)}, "
                              f"got {hp['q_groups']!r}")
        n = self.task.num_domains[kind]
        # log_w: η·(cumulative group loss), shifted so the largest weight that counts is exp(0) (no overflow).
        # seen: groups present in some training step so far (under "all": every id counts from the start).
        self.register_buffer("log_w", torch.zeros(n))
        self.register_buffer("seen", torch.full((n,), hp["q_groups"] == "all"))


    @property
    def q(self) -> torch.Tensor:
        """Current group weights [G]: softmax of log_w over the groups that count, 0 for the others."""
        if not bool(self.seen.any()):
            return torch.zeros_like(self.log_w)
        masked = self.log_w.masked_fill(~self.seen, float("-inf"))
        return torch.softmax(masked, 0)

    def robust_loss(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Update q from the present groups' mean losses, then return Σ_g q_g ℓ_g (q constant for backward)."""
        n = self.log_w.numel()
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
            self.seen |= present
            # q·exp(η ℓ) renormalised ≡ adding η ℓ to the log-weights of the present groups (absent: ℓ = 0).
            log_w = self.log_w + torch.where(present, self.hparams["step_size"] * global_mean, 0.0).to(self.log_w)
            if bool(self.seen.any()):
                log_w = log_w - log_w[self.seen].max()
            self.log_w.copy_(log_w)
            q = self.q.to(local.dtype)
        return (q * local).sum()

    def training_step(self, batches: Batch | list[Batch]) -> dict[str, float]:
        batch = Batch.concat(as_list(batches))
        mask = queries_with_labels(batch)
        logits = self.network(batch.images)
        groups = domain_ids(self, batch, self.hparams["domain_kind"])
        loss = self.robust_loss(logits[mask], batch.labels[mask], groups[mask])
        if not bool(mask.any()):
            loss = loss + logits.sum() * 0.0  # keep the graph connected so every rank backpropagates
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach()), "q_max": float(self.q.max()), "groups_seen": float(self.seen.sum()),
                "train_acc": accuracy(logits[mask].detach(), batch.labels[mask])}
