"""ABRA's perturbation of a plate-pure batch's channel statistics (methods/abra.py says which choices are the paper's).

μ = mean_{i,h,w} F, σ = √(var_{i,h,w} F + eps): one "bio-batch style" per plate-pure batch. The layer moves
them to μ' = μ + δ_μ, σ' = max(σ + δ_σ, sigma_floor · σ) and returns F̃ = σ'(F − μ)/σ + μ', computed as
F + (σ'/σ − 1)(F − μ) + δ_μ so that δ = 0 returns F bit for bit.

Scales s_μ, s_σ ∈ R^C (detached) put δ in feature units:
  scale "batch":  the spread over the current batch's images of their per-image channel statistics (DSU's Σ,
                  unbiased std over the batch); no state.
  scale "plates": the std *across plates* of the batch-level (μ, σ), from EMAs (momentum `momentum`) of their
                  first and second moments, averaged over DDP ranks so every rank holds the same s.
variant "structured": φ = (a_μ, a_σ, d_μ, d_σ), scalar magnitudes a (init a_init), directions d ∈ R^C (init N(0, I));
    δ_μ = a_μ · s_μ ⊙ (ε_μ + r · d_μ/‖d_μ‖), r = 1 (direction "unit") or √C (direction "sqrt_c"); likewise δ_σ.
variant "simple": φ = (θ_μ, θ_σ) ∈ R^C (init a_init); δ_μ = s_μ ⊙ θ_μ ⊙ ε_μ, likewise δ_σ.
ε ~ N(0, I_C), one draw per forward through `draw` (tests pin it, an ascent loop replays it with `frozen_noise`).
`project()` clamps the magnitudes a (or θ) to [0, a_max]. `update_stats` counts steps; the layer is `active`
once more than `warmup_steps` have been counted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..precision import full_precision
from .style import StyleModule, batch_spread, batch_stats, instance_stats

VARIANTS = ("structured", "simple")
SCALES = ("batch", "plates")
DIRECTIONS = ("unit", "sqrt_c")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


class BatchStyleUncertainty(StyleModule):
    """Training-only perturbation of a plate-pure batch's channel statistics; the identity in eval mode."""

    def __init__(self, channels: int, variant: str = "structured", a_init: float = 0.5, a_max: float = 2.0,
                 scale: str = "batch", momentum: float = 0.1, warmup_steps: int = 0, direction: str = "unit",
                 sigma_floor: float = 0.0, eps: float = 1e-5, detach_stats: bool = False):
        super().__init__()
        for what, value, allowed in (("variant", variant, VARIANTS), ("scale", scale, SCALES),
                                     ("direction", direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"ABRA {what} must be one of {allowed}, got {value!r}")
        self.channels, self.variant, self.a_max, self.scale, self.direction = channels, variant, a_max, scale, direction
        self.momentum, self.warmup_steps, self.eps = momentum, warmup_steps, eps
        self.sigma_floor, self.detach_stats = sigma_floor, detach_stats
        for name in ("m1_mu", "m2_mu", "m1_sigma", "m2_sigma"):
            self.register_buffer(name, torch.zeros(channels))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        if variant == "structured":
            self.a_mu = nn.Parameter(torch.tensor(float(a_init)))
            self.a_sigma = nn.Parameter(torch.tensor(float(a_init)))
            self.d_mu = nn.Parameter(torch.randn(channels))
            self.d_sigma = nn.Parameter(torch.randn(channels))
        else:
            self.theta_mu = nn.Parameter(torch.full((channels,), float(a_init)))
            self.theta_sigma = nn.Parameter(torch.full((channels,), float(a_init)))

    # ---- scales --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_stats(self, fmap: torch.Tensor) -> None:
        """Count the step; with scale "plates", fold this step's batch statistics (all ranks') into the EMAs."""
        if self.scale == "plates":
            mu, sigma = (s.flatten() for s in batch_stats(fmap.detach(), self.eps))
            moments = distributed.allreduce_mean(torch.cat([mu, mu * mu, sigma, sigma * sigma]))
            first = int(self.steps_seen) == 0
            for buf, value in zip((self.m1_mu, self.m2_mu, self.m1_sigma, self.m2_sigma), moments.split(self.channels)):
                buf.copy_(value if first else (1 - self.momentum) * buf + self.momentum * value)
        self.steps_seen += 1

    @property
    def active(self) -> bool:
        return int(self.steps_seen) > self.warmup_steps

    def scales(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_μ, s_σ) ∈ R^C, detached: from `fmap` itself (scale "batch") or from the across-plate EMAs."""
        if self.scale == "batch":
            mu, sigma = instance_stats(fmap.detach(), self.eps)
            return batch_spread(mu, self.eps).flatten(), batch_spread(sigma, self.eps).flatten()
        return ((self.m2_mu - self.m1_mu ** 2).clamp_min(0).sqrt(),
                (self.m2_sigma - self.m1_sigma ** 2).clamp_min(0).sqrt())

    # ---- the perturbation ----------------------------------------------------------------------------------
    def shifts(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(δ_μ, δ_σ) ∈ R^C for this forward."""
        s_mu, s_sigma = self.scales(fmap)
        eps_mu = self.draw("eps_mu", lambda: torch.randn(self.channels, device=fmap.device, dtype=fmap.dtype))
        eps_sigma = self.draw("eps_sigma", lambda: torch.randn(self.channels, device=fmap.device, dtype=fmap.dtype))
        if self.variant == "simple":
            return s_mu * self.theta_mu * eps_mu, s_sigma * self.theta_sigma * eps_sigma
        r = math.sqrt(self.channels) if self.direction == "sqrt_c" else 1.0
        return (self.a_mu * s_mu * (eps_mu + r * _unit(self.d_mu)),
                self.a_sigma * s_sigma * (eps_sigma + r * _unit(self.d_sigma)))

    @full_precision
    def perturb(self, fmap: torch.Tensor) -> torch.Tensor:
        mu, sigma = batch_stats(fmap, self.eps)
        if self.detach_stats:
            mu, sigma = mu.detach(), sigma.detach()
        delta_mu, delta_sigma = (d.view(1, -1, 1, 1) for d in self.shifts(fmap))
        new_sigma = torch.maximum(sigma + delta_sigma, self.sigma_floor * sigma)
        return fmap + (new_sigma / sigma - 1) * (fmap - mu) + delta_mu

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.perturb(fmap) if self.training else fmap

    def magnitudes(self) -> list[nn.Parameter]:
        return [self.a_mu, self.a_sigma] if self.variant == "structured" else [self.theta_mu, self.theta_sigma]

    @torch.no_grad()
    def project(self) -> None:
        """Keep the uncertainty bounded: the magnitudes a (structured) or θ (simple) clamped to [0, a_max]."""
        for magnitude in self.magnitudes():
            magnitude.clamp_(0.0, self.a_max)
