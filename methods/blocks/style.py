"""Feature-statistics helpers and the instance-style modules MixStyle, DSU and AdvStyle (§1, §3.6–3.8).

All modules sit at backbone insertion points (`Backbone.set_insert`), act only in training mode and
return their input object unchanged otherwise (an exact identity). Every random draw (apply or not,
λ, permutation, Gaussian noise, AdvStyle's branch) goes through `StyleModule.draw`, so tests can pin
it (`module.pin(eps_mu=...)`) and inner loops can replay it (`frozen_noise`).

Instance statistics use the biased variance over (h, w) plus ε, as in the BN notation of §1; the
official MixStyle/DSU code uses torch's default unbiased variance there (differs by h·w/(h·w−1)).
The spread of the statistics across the batch (DSU's Σ) uses the unbiased variance over the batch,
as the official DSU code does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .. import distributed
from ..backbones import INSERTION_POINTS
from ..base import MethodError
from .grl import grad_reverse


# ---- statistics -----------------------------------------------------------------------------
def instance_stats(fmap: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and √(var + eps) over (h, w); shapes [B, C, 1, 1]."""
    var, mu = torch.var_mean(fmap, dim=(2, 3), keepdim=True, correction=0)
    return mu, torch.sqrt(var + eps)


def batch_stats(fmap: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and √(var + eps) over (batch, h, w); shapes [1, C, 1, 1]."""
    var, mu = torch.var_mean(fmap, dim=(0, 2, 3), keepdim=True, correction=0)
    return mu, torch.sqrt(var + eps)


def batch_spread(stat: torch.Tensor, eps: float) -> torch.Tensor:
    """DSU's Σ: √(unbiased var over the batch + eps) of per-sample statistics [B, C, 1, 1] → [1, C, 1, 1]."""
    correction = 1 if stat.shape[0] > 1 else 0
    return torch.sqrt(torch.var(stat, dim=0, keepdim=True, correction=correction) + eps)


def restyle(fmap: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, new_mu: torch.Tensor,
            new_sigma: torch.Tensor) -> torch.Tensor:
    """Replace the statistics (mu, sigma) of `fmap` by (new_mu, new_sigma)."""
    return new_sigma * ((fmap - mu) / sigma) + new_mu


# ---- randomness that tests can pin and inner loops can replay --------------------------------
class StyleModule(nn.Module):
    """Base class: random draws are named; a pinned name returns the pinned value instead of drawing."""

    def __init__(self) -> None:
        super().__init__()
        self._pinned: dict[str, object] = {}
        self._recording = False

    def draw(self, key: str, make: Callable[[], object]) -> object:
        if key in self._pinned:
            return self._pinned[key]
        value = make()
        if self._recording:
            self._pinned[key] = value
        return value

    def pin(self, **values: object) -> None:
        """Fix named draws (e.g. `apply=True`, `eps_mu=tensor`) until `unpin`."""
        self._pinned.update(values)

    def unpin(self, *keys: str) -> None:
        """Forget the named pins (all pins when no name is given)."""
        for key in keys or list(self._pinned):
            self._pinned.pop(key, None)


@contextlib.contextmanager
def pinned(layers: Iterable[StyleModule], **values: object) -> Iterator[None]:
    """Pin `values` on each layer inside the block, except names a caller had already pinned."""
    added = []
    for layer in layers:
        keys = [k for k in values if k not in layer._pinned]
        layer.pin(**{k: values[k] for k in keys})
        added.append((layer, keys))
    try:
        yield
    finally:
        for layer, keys in added:
            if keys:
                layer.unpin(*keys)


@contextlib.contextmanager
def frozen_noise(module: nn.Module) -> Iterator[None]:
    """Within the block, the first draw of each name in every StyleModule of `module` is replayed."""
    styles = [m for m in module.modules() if isinstance(m, StyleModule)]
    before = [set(m._pinned) for m in styles]
    for m in styles:
        m._recording = True
    try:
        yield
    finally:
        for m, keys in zip(styles, before):
            m._recording = False
            for key in set(m._pinned) - keys:
                del m._pinned[key]


def _randn_like(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn_like(t)


def _coin(p: float, device) -> Callable[[], bool]:
    return lambda: bool(torch.rand((), device=device) < p)


# ---- the modules ------------------------------------------------------------------------------
class MixStyleLayer(StyleModule):
    """MixStyle (Zhou et al. 2021): mix detached instance statistics of pairs of samples.

    mix="random": partner j = a random permutation of the batch. mix="crossdomain": partner j is
    drawn uniformly from rows of another group (`set_groups` before the forward; in this harness
    the groups are the plates of a multi-plate step).
    """

    MIXES = ("random", "crossdomain")

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, mix: str = "random"):
        super().__init__()
        if mix not in self.MIXES:
            raise ValueError(f"MixStyle mix must be one of {self.MIXES}, got {mix!r}")
        self.p, self.alpha, self.eps, self.mix = p, alpha, eps, mix
        self.groups: torch.Tensor | None = None

    def set_groups(self, groups: torch.Tensor | None) -> None:
        self.groups = groups

    def _partner(self, n: int, device) -> torch.Tensor:
        if self.mix == "random":
            return torch.randperm(n, device=device)
        if self.groups is None or self.groups.shape[0] != n:
            raise ValueError("MixStyle mix='crossdomain' needs set_groups(ids) with one id per row before forward")
        groups = self.groups.to(device)
        other = groups[:, None] != groups[None, :]
        # argmax of uniform scores restricted to other-group rows = a uniform draw among them
        partner = torch.rand(n, n, device=device).masked_fill(~other, -1.0).argmax(1)
        # a row whose group is alone in the batch keeps itself (no mixing for it)
        return torch.where(other.any(1), partner, torch.arange(n, device=device))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        n = fmap.shape[0]
        if not self.training or n < 2 or not self.draw("apply", _coin(self.p, fmap.device)):
            return fmap
        mu, sigma = (s.detach() for s in instance_stats(fmap, self.eps))  # stop-grad through the statistics
        beta = torch.distributions.Beta(torch.tensor(self.alpha, device=fmap.device),
                                        torch.tensor(self.alpha, device=fmap.device))
        lam = self.draw("lam", lambda: beta.sample((n, 1, 1, 1)).to(fmap.dtype))
        perm = self.draw("perm", lambda: self._partner(n, fmap.device))
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sigma = lam * sigma + (1 - lam) * sigma[perm]
        return restyle(fmap, mu, sigma, mix_mu, mix_sigma)


class DSULayer(StyleModule):
    """DSU (Li et al. 2022): resample instance statistics from N(μ_i, Σ²) with Σ the batch spread."""

    def __init__(self, p: float = 0.5, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if not self.training or fmap.shape[0] < 2 or not self.draw("apply", _coin(self.p, fmap.device)):
            return fmap
        return dsu_perturb(self, fmap, self.eps)


def dsu_perturb(module: StyleModule, fmap: torch.Tensor, eps: float) -> torch.Tensor:
    """β_i = μ_i + ε₁Σ_μ, γ_i = σ_i + ε₂Σ_σ; statistics not detached (as in the official code)."""
    mu, sigma = instance_stats(fmap, eps)
    new_mu = mu + module.draw("eps_mu", _randn_like(mu)) * batch_spread(mu, eps).detach()
    new_sigma = sigma + module.draw("eps_sigma", _randn_like(sigma)) * batch_spread(sigma, eps).detach()
    return restyle(fmap, mu, sigma, new_mu, new_sigma)


class AdvStyleLayer(StyleModule):
    """AdvStyle (Zhang et al. 2023): DSU-like noise with adversarially learned per-channel scales θ.

    Each training forward picks a branch uniformly from BRANCHES (pin `branch` to force one). The
    "adv" branch uses μ' = μ + ε₁⊙GRL(θ_μ), σ' = σ + ε₂⊙GRL(θ_σ), so an optimiser that descends on the
    gradient of θ ascends the task loss. θ is set, on the first training forward, to the detached DSU
    spread of that batch (averaged over ranks so every rank starts equal).
    """

    BRANCHES = ("identity", "adv", "dsu")

    def __init__(self, channels: int, adv_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.adv_weight, self.eps = adv_weight, eps
        self.theta_mu = nn.Parameter(torch.zeros(channels))
        self.theta_sigma = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _initialize(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        with torch.no_grad():
            self.theta_mu.copy_(distributed.allreduce_mean(batch_spread(mu, self.eps).flatten()))
            self.theta_sigma.copy_(distributed.allreduce_mean(batch_spread(sigma, self.eps).flatten()))
            self.initialized.fill_(True)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return fmap
        branch = self.draw("branch", lambda: self.BRANCHES[int(torch.randint(3, ()))])
        if branch == "identity" or (branch == "dsu" and fmap.shape[0] < 2):
            return fmap
        if branch == "dsu":
            return dsu_perturb(self, fmap, self.eps)
        mu, sigma = instance_stats(fmap, self.eps)
        if not bool(self.initialized):
            self._initialize(mu.detach(), sigma.detach())
        theta_mu = grad_reverse(self.theta_mu, self.adv_weight).view(1, -1, 1, 1)
        theta_sigma = grad_reverse(self.theta_sigma, self.adv_weight).view(1, -1, 1, 1)
        new_mu = mu + self.draw("eps_mu", _randn_like(mu)) * theta_mu
        new_sigma = sigma + self.draw("eps_sigma", _randn_like(sigma)) * theta_sigma
        return restyle(fmap, mu, sigma, new_mu, new_sigma)


# ---- placing modules in a backbone ------------------------------------------------------------
def parse_insertion_points(method: str, text: str) -> tuple[str, ...]:
    """"res1,res2,res3" → ("res1", "res2", "res3"); unknown or empty names are errors naming the value."""
    points = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in points if p not in INSERTION_POINTS]
    if bad or not points:
        what = f"unknown point(s) {', '.join(map(repr, bad))}" if bad else "no point"
        raise MethodError(f"method {method!r}: hyperparameter 'layers' = {text!r} names {what}; use a "
                          f"comma-separated subset of {', '.join(INSERTION_POINTS)}")
    return points


def insertion_channels(featurizer, in_channels: int) -> dict[str, int]:
    """Channels of the feature map at each insertion point (one tiny eval-mode forward; buffers untouched)."""
    was_training = featurizer.training
    featurizer.eval()
    param = next(featurizer.parameters())
    x = torch.zeros(1, in_channels, 8, 8, device=param.device, dtype=param.dtype)
    out = {}
    try:
        with torch.no_grad():
            for point, stage in featurizer.stages():
                x = stage(x)
                out[point] = int(x.shape[1])
    finally:
        featurizer.train(was_training)
    return out
