"""ABRA's batch-level style perturbation (methods-research §3.9) — RECONSTRUCTED, not the authors' equations.

ABRA's equations and code are not public (§0.2). What is known: the perturbed quantity is the
batch-level channel statistics (μ, σ) of a plate-pure batch at res4, with a learnable, bounded
uncertainty magnitude/direction shared across bio-batches. Everything below beyond that is [RECON].

μ = mean_{i,h,w} F, σ = √(var_{i,h,w} F + eps) (one "bio-batch style" per plate-pure batch).
Scales s_μ, s_σ ∈ R^C estimate the std of (μ, σ) *across* plates: EMAs (momentum `momentum`) of
the first and second moments of each step's batch statistics, averaged over DDP ranks so every
rank holds the same s. The layer is `active` once `warmup_steps` updates have been seen.

variant "structured": φ = (a_μ, a_σ, d_μ, d_σ), magnitudes a ∈ [0, a_max] (projected), directions d ∈ R^C;
    δ_μ = a_μ · s_μ ⊙ (ε_μ + √C · d_μ/‖d_μ‖), likewise δ_σ; ε ~ N(0, I_C), one draw per batch.
variant "simple" (AdvStyle at batch level): φ = (θ_μ, θ_σ) ∈ R^C, set to (s_μ, s_σ) when the layer becomes
    active, projected to [0, a_max · s]; δ_μ = ε_μ ⊙ θ_μ, likewise δ_σ.
μ' = μ + δ_μ, σ' = max(σ + δ_σ, sigma_floor · σ), and F̃ = σ'(F − μ)/σ + μ', computed as
F + (σ'/σ − 1)(F − μ) + δ_μ so that δ = 0 returns F bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from .style import StyleModule, batch_stats

VARIANTS = ("structured", "simple")


class BatchStyleUncertainty(StyleModule):
    """Training-only perturbation of a plate-pure batch's channel statistics; the identity in eval mode."""

    def __init__(self, channels: int, variant: str = "structured", a_max: float = 2.0, a_init: float = 0.5,
                 momentum: float = 0.1, warmup_steps: int = 10, eps: float = 1e-5, sigma_floor: float = 1e-3,
                 detach_stats: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ABRA variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= a_init <= a_max:
            raise ValueError(f"ABRA needs 0 <= a_init <= a_max, got a_init={a_init}, a_max={a_max}")
        self.channels, self.variant, self.a_max = channels, variant, a_max
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
            self.theta_mu = nn.Parameter(torch.zeros(channels))
            self.theta_sigma = nn.Parameter(torch.zeros(channels))

    # ---- scales s estimated across plates -------------------------------------------------------
    @torch.no_grad()
    def update_stats(self, fmap: torch.Tensor) -> None:
        """Fold this step's batch statistics (all ranks' plates) into the moment EMAs."""
        mu, sigma = (s.flatten() for s in batch_stats(fmap.detach(), self.eps))
        moments = distributed.allreduce_mean(torch.cat([mu, mu * mu, sigma, sigma * sigma]))
        new = moments.split(self.channels)
        first = int(self.steps_seen) == 0
        for buf, value in zip((self.m1_mu, self.m2_mu, self.m1_sigma, self.m2_sigma), new):
            buf.copy_(value if first else (1 - self.momentum) * buf + self.momentum * value)
        self.steps_seen += 1
        if self.variant == "simple" and int(self.steps_seen) == self.warmup_steps:
            s_mu, s_sigma = self.scales()
            self.theta_mu.copy_(s_mu)
            self.theta_sigma.copy_(s_sigma)

    @property
    def active(self) -> bool:
        return int(self.steps_seen) >= max(self.warmup_steps, 1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_μ, s_σ): std across plates of the batch-level μ and σ, from the moment EMAs."""
        return ((self.m2_mu - self.m1_mu ** 2).clamp_min(0).sqrt(),
                (self.m2_sigma - self.m1_sigma ** 2).clamp_min(0).sqrt())

    # ---- the perturbation ----------------------------------------------------------------------------
    def shifts(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(δ_μ, δ_σ) ∈ R^C for this forward (noise drawn through `draw`, so it can be pinned/replayed)."""
        s_mu, s_sigma = self.scales()
        eps_mu = self.draw("eps_mu", lambda: torch.randn(self.channels, device=like.device, dtype=like.dtype))
        eps_sigma = self.draw("eps_sigma", lambda: torch.randn(self.channels, device=like.device, dtype=like.dtype))
        if self.variant == "simple":
            return eps_mu * self.theta_mu, eps_sigma * self.theta_sigma
        root_c = math.sqrt(self.channels)
        d_mu = self.d_mu / self.d_mu.norm().clamp_min(1e-12) * root_c
        d_sigma = self.d_sigma / self.d_sigma.norm().clamp_min(1e-12) * root_c
        return self.a_mu * s_mu * (eps_mu + d_mu), self.a_sigma * s_sigma * (eps_sigma + d_sigma)

    def perturb(self, fmap: torch.Tensor) -> torch.Tensor:
        mu, sigma = batch_stats(fmap, self.eps)
        if self.detach_stats:
            mu, sigma = mu.detach(), sigma.detach()
        delta_mu, delta_sigma = (d.view(1, -1, 1, 1) for d in self.shifts(fmap))
        new_sigma = torch.maximum(sigma + delta_sigma, self.sigma_floor * sigma)
        return fmap + (new_sigma / sigma - 1) * (fmap - mu) + delta_mu

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.perturb(fmap) if self.training else fmap

    @torch.no_grad()
    def project(self) -> None:
        """Keep the uncertainty bounded: a ∈ [0, a_max] (structured) or θ ∈ [0, a_max·s] (simple)."""
        if self.variant == "structured":
            self.a_mu.clamp_(0.0, self.a_max)
            self.a_sigma.clamp_(0.0, self.a_max)
        else:
            s_mu, s_sigma = self.scales()
            self.theta_mu.copy_(torch.minimum(self.theta_mu.clamp_min(0.0), self.a_max * s_mu))
            self.theta_sigma.copy_(torch.minimum(self.theta_sigma.clamp_min(0.0), self.a_max * s_sigma))
