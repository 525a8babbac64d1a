"""The losses and update rules of the self-supervised methods (methods/simclr.py, byol.py, dino.py).

Each follows its official implementation's equations (read from the repositories named below; tested against
independent re-derivations in tests/test_ssl.py). Losses are computed in float32 whatever the autocast dtype
of the embeddings (`full_precision`: autocast off, float32 inputs), as the references do.

* `nt_xent`: SimCLR's contrastive loss (google-research/simclr tf2/objective.py `add_contrastive_loss`).
* `byol_regression`: BYOL's 2 − 2·cos (google-deepmind/deepmind-research byol/utils/helpers.py `regression_loss`).
* `ema_update_`, `cosine_schedule`: the target/teacher EMA and its momentum schedule (byol/utils/schedules.py
  `target_ema`; facebookresearch/dino utils.py `cosine_scheduler`, main_dino.py `train_one_epoch`).
* `DINOHead`, `MultiCrop`, `DINOLoss`, `teacher_temperature`, `teacher_entropy`, `clip_per_parameter_`,
  `weight_decay_groups`: facebookresearch/dino vision_transformer.py `DINOHead`, utils.py `MultiCropWrapper`,
  `clip_gradients`, `get_params_groups`, main_dino.py `DINOLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..precision import full_precision

LARGE_NUM = 1e9  # SimCLR's mask value for an anchor's similarity with itself


# ---- SimCLR ----------------------------------------------------------------------------------------
def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows (in rank order) and this rank's offset among them. The gather is differentiable (each
    rank's gradient w.r.t. another rank's rows flows back to that rank), as SimCLR's cross-replica concat; ranks
    may hold different numbers of rows (a short last batch)."""
    if distributed.world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn

    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(distributed.world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts = dist_nn.all_gather(padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:distributed.rank()])


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, global_negatives: bool = True) -> torch.Tensor:
    """SimCLR's loss for the projections z1, z2 [N, D] of two views of the same N images.

    With ĥ = z/‖z‖ and τ the temperature, for anchor i of view 1 the logits are [ĥ1_i·ĥ2_k/τ]_k (the positive
    at k = i) followed by [ĥ1_i·ĥ1_k/τ]_k with the anchor itself masked (−1e9); symmetrically for view 2; the
    loss is the mean over i of CE_a(i) + CE_b(i) (the official code's form: twice the paper's mean over 2N).
    `global_negatives`: the keys are every rank's rows (the official cross-replica concat)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    k1, offset = gather_with_grad(z1) if global_negatives else (z1, 0)
    k2, _ = gather_with_grad(z2) if global_negatives else (z2, 0)
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device) + offset
    masks = F.one_hot(labels, k1.shape[0]).to(z1.dtype)
    logits_aa = z1 @ k1.T / temperature - masks * LARGE_NUM
    logits_bb = z2 @ k2.T / temperature - masks * LARGE_NUM
    logits_ab = z1 @ k2.T / temperature
    logits_ba = z2 @ k1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels, reduction="none")
    return (loss_a + loss_b).mean()


# ---- BYOL ------------------------------------------------------------------------------------------
@full_precision
def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """‖p̂ − ẑ‖² per row (= 2 − 2·cos(p, z)); x̂ = x / max(‖x‖, 1e-6) as BYOL's l2_normalize (ε = 1e-12 on ‖x‖²)."""
    p, z = F.normalize(p, dim=-1, eps=1e-6), F.normalize(z, dim=-1, eps=1e-6)
    return ((p - z) ** 2).sum(-1)


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """target ← target + (1 − m)·(online − target) (= m·target + (1 − m)·online), parameter by parameter."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors for {len(online)} online tensors")
    for t, o in zip(target, online):
        t.lerp_(o.detach(), 1.0 - momentum)


def cosine_schedule(base: float, final: float, step: int, total: int) -> float:
    """final + (base − final)·(1 + cos(π·k/K))/2 with k = min(step, K): BYOL's τ (final 1) and DINO's teacher
    momentum (final 1) and weight decay; `base` while the number of steps K is unknown (0)."""
    if total <= 0:
        return base
    k = min(step, total)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * k / total))


# ---- DINO ------------------------------------------------------------------------------------------
def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO's schedule: np.linspace(warmup_temp, temp, warmup_epochs) over the first epochs, then temp."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


class DINOHead(nn.Module):
    """MLP (GELU; BatchNorm optional) → bottleneck → L2 normalisation → weight-normalised linear layer without
    bias, its norm g fixed at 1 with `norm_last_layer`. Linear weights ~ truncated N(0, 0.02²), biases 0."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 layers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        layers = max(layers, 1)
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            mods: list[nn.Module] = []
            for i in range(layers - 1):
                mods.append(nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim))
                if use_bn:
                    mods.append(nn.BatchNorm1d(hidden_dim))
                mods.append(nn.GELU())
            mods.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.mlp(x))

    @full_precision  # its outputs are cosines that the loss divides by τ_t = 0.04: bfloat16's 2-3 digits are ±0.1 there
    def prototypes(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-normalised last layer on the L2-normalised bottleneck features (in float32)."""
        return self.last_layer(F.normalize(x, dim=-1, p=2))


class MultiCrop(nn.Module):
    """A backbone and a head; the backbone runs once per run of consecutive same-resolution crops (so its
    statistics never mix resolutions), the head once on every crop's features. Returns (head output, features)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        features = torch.cat(features)
        return self.head(features), features


@full_precision
def dino_cross_entropy(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                       n_crops: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean over pairs (global crop iq, crop v ≠ iq) of the rows' mean of −Σ_k q_k log s_k, with
    q = softmax((t − center)/τ_t) of the teacher output of crop iq (no gradient) and s = softmax(o/τ_s) of the
    student output of crop v; the outputs are stacked crop-major (`n_crops` student crops, 2 teacher crops)."""
    student = (student_output / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = student_output.new_zeros(()), 0
    for iq, q in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:  # the student's view of the teacher's own crop
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


@full_precision
def teacher_entropy(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean entropy of the centred, sharpened teacher distributions: the part of DINO's cross-entropy that has no
    gradient (CE − entropy = KL(teacher ‖ student), averaged the same way)."""
    log_q = F.log_softmax((teacher_output - center) / teacher_temp, dim=-1)
    return -(log_q.exp() * log_q).sum(-1).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution of each global crop and the student's
    distribution of every other crop, averaged over the (teacher crop, student crop) pairs; then the centre's EMA
    update from the teacher outputs of every rank."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, n_crops: int,
                teacher_temp: float) -> torch.Tensor:
        loss = dino_cross_entropy(student_output, teacher_output, self.center, n_crops, self.student_temp,
                                  teacher_temp)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """center ← m·center + (1 − m)·(mean of the teacher outputs over every rank's rows)."""
        out = teacher_output.detach().float()
        both = torch.cat([out.sum(0), out.new_tensor([out.shape[0]])])
        both = distributed.allreduce_mean(both)  # sums and count share the 1/ranks factor
        batch_center = (both[:-1] / both[-1])[None]
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


@torch.no_grad()
def clip_per_parameter_(params: Iterable[torch.Tensor], clip: float) -> None:
    """DINO's clip_gradients: each parameter's gradient scaled to norm ≤ clip on its own (coef clip/(‖g‖ + 1e-6))."""
    for p in params:
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            p.grad.mul_(coef.clamp(max=1.0))


def weight_decay_groups(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list, list]:
    """(decayed, not decayed) trainable parameters: biases and 1-D parameters (norm layers) are not decayed."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return decay, no_decay
