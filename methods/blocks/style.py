"""Feature-statistics helpers and the instance-style modules MixStyle, DSU and AdvStyle.

All modules sit at backbone insertion points (`Backbone.set_insert`), act only in training mode and
return their input object unchanged otherwise (an exact identity). Every random draw (apply or not,
λ, permutation, Gaussian noise, AdvStyle's branch) goes through `StyleModule.draw`, so tests can pin
it (`module.pin(eps_mu=...)`) and inner loops can replay it (`frozen_noise`).

The three layers follow their official code (tests/test_reference_style.py checks outputs and input
gradients against the reference equations): instance statistics use the unbiased variance over (h, w)
plus ε (torch's default `var`, as the official MixStyle, DSU and AdvStyle layers compute it; a 1×1 map,
where that estimate is undefined and the reference gives NaN, falls back to the biased one), and the
spread of the statistics across the batch (DSU's Σ) the unbiased variance over the batch.
`instance_stats` keeps the biased variance as its default for other callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .. import distributed
from ..backbones import INSERTION_POINTS
from ..errors import MethodError
from ..precision import full_precision
from .grl import grad_reverse


# ---- statistics (float32 under autocast: methods/precision.py) -------------------------------
@full_precision
def instance_stats(fmap: torch.Tensor, eps: float, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and √(var + eps) over (h, w); shapes [B, C, 1, 1].

    `unbiased=True` divides the variance by h·w − 1 (the style layers' reference convention); a 1×1 map keeps
    the biased estimate, since the unbiased one would be NaN there.
    """
    correction = 1 if unbiased and fmap.shape[2] * fmap.shape[3] > 1 else 0
    var, mu = torch.var_mean(fmap, dim=(2, 3), keepdim=True, correction=correction)
    return mu, torch.sqrt(var + eps)


@full_precision
def batch_stats(fmap: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and √(var + eps) over (batch, h, w); shapes [1, C, 1, 1]."""
    var, mu = torch.var_mean(fmap, dim=(0, 2, 3), keepdim=True, correction=0)
    return mu, torch.sqrt(var + eps)


@full_precision
def batch_spread(stat: torch.Tensor, eps: float) -> torch.Tensor:
    """DSU's Σ: √(unbiased var over the batch + eps) of per-sample statistics [B, C, 1, 1] → [1, C, 1, 1]."""
    correction = 1 if stat.shape[0] > 1 else 0
    return torch.sqrt(torch.var(stat, dim=0, keepdim=True, correction=correction) + eps)


@full_precision
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

    Reference: KaiyangZhou/mixstyle-release, `MixStyle`. Per training forward, with probability p:
    λ ~ Beta(α, α) per sample, μ̃ = λμ_i + (1−λ)μ_j, σ̃ = λσ_i + (1−λ)σ_j with μ, σ detached, out =
    σ̃·(x − μ)/σ + μ̃. mix="random": j = a random permutation of the batch. mix="crossdomain": the batch
    holds two domains; every row of one gets a partner from the other, each half's partners being a
    random permutation of the other half (the reference's reversed halves, each shuffled), so the
    pairing is a permutation. Here the two domains are the first and second half of the groups given
    to `set_groups` (a multi-plate step's plate positions 0..k−1, k even): with equal batches per
    plate these are exactly the reference's row halves. Unequal halves (a plate's last, shorter
    batch) are a case the reference does not handle: each row of the larger half still gets a
    partner from the other half, the other half's rows being reused as evenly as possible.
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
        k = int(groups.max()) + 1
        if k % 2:
            raise ValueError(f"MixStyle mix='crossdomain' splits the groups into two halves (two domains); "
                             f"got {k} groups, need an even number")
        second = groups >= k // 2
        # Each half's candidates (the other half's rows) in reverse row order, shuffled, the first half's drawn
        # first: the reference's construction, so that a shared seed gives the same pairing.
        rows = torch.arange(n - 1, -1, -1, device=device)
        pool_for_first, pool_for_second = rows[second.flip(0)], rows[~second.flip(0)]
        if pool_for_first.numel() == 0 or pool_for_second.numel() == 0:
            raise ValueError("MixStyle mix='crossdomain': one of the two halves has no row")
        partner = torch.empty(n, dtype=torch.long, device=device)
        partner[~second] = _cycle(pool_for_first[torch.randperm(len(pool_for_first), device=device)],
                                   int((~second).sum()))
        partner[second] = _cycle(pool_for_second[torch.randperm(len(pool_for_second), device=device)],
                                  int(second.sum()))
        return partner

    @full_precision
    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        n = fmap.shape[0]
        if not self.training or n < 2 or not self.draw("apply", _coin(self.p, fmap.device)):
            return fmap
        # stop-grad through the statistics, as the reference does
        mu, sigma = (s.detach() for s in instance_stats(fmap, self.eps, unbiased=True))
        beta = torch.distributions.Beta(torch.tensor(self.alpha, device=fmap.device),
                                        torch.tensor(self.alpha, device=fmap.device))
        lam = self.draw("lam", lambda: beta.sample((n, 1, 1, 1)).to(fmap.dtype))
        perm = self.draw("perm", lambda: self._partner(n, fmap.device))
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sigma = lam * sigma + (1 - lam) * sigma[perm]
        return restyle(fmap, mu, sigma, mix_mu, mix_sigma)


def _cycle(pool: torch.Tensor, k: int) -> torch.Tensor:
    """k entries of `pool` in order, cycling when k > len(pool) (each entry used as evenly as possible)."""
    return pool[torch.arange(k, device=pool.device) % len(pool)]


class DSULayer(StyleModule):
    """DSU (Li et al. 2022): resample instance statistics from N(μ_i, Σ²) with Σ the batch spread.

    Reference: lixiaotong97/DSU, `DistributionUncertainty`. With probability p per training forward:
    μ_i, σ_i = mean and √(unbiased var + ε) over (h, w); Σ_μ, Σ_σ = √(unbiased var over the batch + ε) of
    μ and σ; β = μ + ε₁Σ_μ, γ = σ + ε₂Σ_σ (ε ~ N(0, I)); out = γ·(x − μ)/σ + β. Nothing is detached:
    gradients flow through μ, σ and Σ. `detach_spread=True` (not the reference) stops the gradient
    through Σ only; outputs are unchanged. A batch of one row is returned as is (Σ is undefined).
    """

    def __init__(self, p: float = 0.5, eps: float = 1e-6, detach_spread: bool = False):
        super().__init__()
        self.p, self.eps, self.detach_spread = p, eps, detach_spread

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if not self.training or fmap.shape[0] < 2 or not self.draw("apply", _coin(self.p, fmap.device)):
            return fmap
        return dsu_perturb(self, fmap, self.eps, self.detach_spread)


@full_precision
def dsu_perturb(module: StyleModule, fmap: torch.Tensor, eps: float, detach_spread: bool = False) -> torch.Tensor:
    """β_i = μ_i + ε₁Σ_μ, γ_i = σ_i + ε₂Σ_σ; nothing detached unless `detach_spread` (then Σ only)."""
    mu, sigma = instance_stats(fmap, eps, unbiased=True)
    spread_mu, spread_sigma = batch_spread(mu, eps), batch_spread(sigma, eps)
    if detach_spread:
        spread_mu, spread_sigma = spread_mu.detach(), spread_sigma.detach()
    new_mu = mu + module.draw("eps_mu", _randn_like(mu)) * spread_mu
    new_sigma = sigma + module.draw("eps_sigma", _randn_like(sigma)) * spread_sigma
    return restyle(fmap, mu, sigma, new_mu, new_sigma)


class AdvStyleLayer(StyleModule):
    """AdvStyle (Zhang et al. 2023): DSU-like noise with adversarially learned per-channel scales θ.

    Reference: YBZh/AdvStyle, `Dassl.pytorch/dassl/modeling/ops/advstyle.py`. Each training forward
    picks a branch uniformly from BRANCHES (pin `branch` to force one). "identity" returns the input;
    "dsu" is DSU's perturbation (Σ not detached, as in the reference's DSU branch); "adv" uses
    μ' = μ + ε₁⊙GRL(θ_μ), σ' = σ + ε₂⊙GRL(θ_σ), out = σ'·(x − μ)/σ + μ', so an optimiser that descends on
    the gradient of θ ascends the task loss. Statistics as in DSU (unbiased variance over (h, w) + ε, not
    detached). θ is set, on the first "adv" forward, to the detached DSU spread Σ of that batch (as the
    reference does), averaged over ranks so every rank starts equal. The "dsu" branch on a batch of one
    row returns it as is (the reference would produce NaN).
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

    @full_precision
    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return fmap
        branch = self.draw("branch", lambda: self.BRANCHES[int(torch.randint(3, ()))])
        if branch == "identity" or (branch == "dsu" and fmap.shape[0] < 2):
            return fmap
        if branch == "dsu":
            return dsu_perturb(self, fmap, self.eps)
        mu, sigma = instance_stats(fmap, self.eps, unbiased=True)
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
