"""ABA's Bayesian augmentation network and its two objectives (Cheng, Gokhale & Yang, ICCV 2023; code
github.com/shengcheng/ABA: `lib/networks/bayes_cnn.py`, `lib/networks/multi_bnn.py`, `trainer_bnn.py`).

Bayesian convolution (`BConv2d`): every weight w has a Gaussian posterior N(μ, σ²) with σ = softplus(ρ) =
log(1 + e^ρ), and every forward draws fresh weights by reparameterisation, w = μ + ε·σ, ε ~ N(0, 1) (the
weight's ε first, then the bias's), even in eval mode. Re-initialisation (`randomize`, once per training
step): μ ~ N(0, 0.1²), ρ ~ N(−1, 0.1²). Prior N(0, σ₀²) with σ₀ = 1/√(3·k²) (the 3 is the reference's RGB
fan-in, a constant for every layer whatever its input channels). The layer's KL term is the reference's
`calculate_kl(prior_mu, prior_sigma, μ, σ)`, i.e. KL(prior ‖ posterior) averaged (not summed) over the
elements: mean(log(σ/σ₀) + (σ₀² + (μ − 0)²)/(2σ²) − ½), plus the same for the bias where there is one.

Multi-scale layer (`MultiScaleBConv2d`): one Bayesian convolution per kernel size (1, 3, 5, 7; padding k//2);
`randomize` picks one size uniformly and re-initialises that convolution only; forwards use the picked one.

Augmenter (`Multi_BNN`): `depth` hidden layers C → 18 → … → 18 with bias, each followed by LeakyReLU(0.2),
then a final layer 18 → C without bias whose output is clamped to [0.001, 1.0] (the reference's hard-coded
range, applied to its normalised images; C is 3 there, the image's channel count here). It returns the
augmented images and the sum of its layers' KL terms.

Objectives (`trainer_bnn.py`): the adversary minimises −CE(f(g(x)), y) − β·KL (`adversarial_loss`), and
the classifier's consistency term (`consistency_loss`) is, with p = softmax(f(x)), p_r = softmax(f(x_r)),
p_g = softmax(f(x_g)/T) and weight w (`wr`):
    m = (p + w·p_r + (2 − w)·p_g)/3,  log m = log(clamp(m, 1e-4, 1)),
    L_cl = [KL(p‖m) + w·KL(p_r‖m) + (2 − w)·KL(p_g‖m)]/3,  KL(a‖m) = Σ_k a_k(log a_k − log m_k), batch mean.
Losses are computed in float32 whatever the autocast dtype of the convolutions. log a_k is taken from
log_softmax, so a probability that underflows to 0 in float32 gives the gradient's limit (0) where the reference's
KLDivLoss gives 0·∞ = NaN (an augmented view with a logit gap over ~104 diverged a run at its adversary's start).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MU_INIT = (0.0, 0.1)  # posterior μ at every re-initialisation: N(mean, std)
RHO_INIT = (-1.0, 0.1)  # posterior ρ: N(mean, std); σ = softplus(ρ) ≈ 0.31
PRIOR_FAN_IN = 3  # σ₀ = 1/√(3·k²): the reference's constant (its RGB input), for every layer
CLAMP_RANGE = (0.001, 1.0)  # the final layer's output range in the reference
LEAKY_SLOPE = 0.2
MIX_FLOOR = 1e-4  # the mixture's clamp inside the log


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (autocast outputs) in float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def prior_sigma(kernel_size: int) -> float:
    return 1.0 / math.sqrt(PRIOR_FAN_IN * kernel_size * kernel_size)


def kl_prior_to_posterior(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma_: float) -> torch.Tensor:
    """mean over elements of KL(N(0, σ₀²) ‖ N(μ, σ²)), the reference's direction and reduction."""
    mu, sigma = at_least_fp32(mu), at_least_fp32(sigma)
    return 0.5 * (2 * torch.log(sigma / prior_sigma_) - 1 + (prior_sigma_ / sigma) ** 2 + (mu / sigma) ** 2).mean()


class BayesConv2d(nn.Module):
    """A k×k convolution with a factorised Gaussian posterior over its weights (and bias), sampled per forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.kernel_size = kernel_size
        self.prior_sigma = prior_sigma(kernel_size)
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight_mu = nn.Parameter(torch.zeros(shape))
        self.weight_rho = nn.Parameter(torch.full(shape, RHO_INIT[0]))
        self.bias_mu = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.bias_rho = nn.Parameter(torch.full((out_channels,), RHO_INIT[0])) if bias else None

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Fresh posterior: μ ~ N(0, 0.1²), ρ ~ N(−1, 0.1²), in the reference's order (weight μ, ρ, bias μ, ρ)."""
        for p, (mean, std) in ((self.weight_mu, MU_INIT), (self.weight_rho, RHO_INIT),
                               (self.bias_mu, MU_INIT), (self.bias_rho, RHO_INIT)):
            if p is not None:
                # Drawn on the CPU from the shared generator, so that every rank draws the same values.
                p.copy_(torch.randn(p.shape, generator=generator) * std + mean)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w = μ + ε·softplus(ρ) with ε from torch's global generator (the weight's draw, then the bias's)."""
        weight = self.weight_mu + torch.randn_like(self.weight_mu) * F.softplus(self.weight_rho)
        if self.bias_mu is None:
            return weight, None
        return weight, self.bias_mu + torch.randn_like(self.bias_mu) * F.softplus(self.bias_rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.sample()
        return F.conv2d(x, weight, bias, padding=self.kernel_size // 2)

    def kl(self) -> torch.Tensor:
        kl = kl_prior_to_posterior(self.weight_mu, F.softplus(self.weight_rho), self.prior_sigma)
        if self.bias_mu is not None:
            kl = kl + kl_prior_to_posterior(self.bias_mu, F.softplus(self.bias_rho), self.prior_sigma)
        return kl


class MultiScaleBayesConv(nn.Module):
    """One BayesConv2d per kernel size; `randomize` picks the size in use and re-initialises that one only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int], bias: bool,
                 clamp: tuple[float, float] | None = None):
        super().__init__()
        self.kernel_sizes = tuple(kernel_sizes)
        self.convs = nn.ModuleDict({str(k): BayesConv2d(in_channels, out_channels, k, bias) for k in kernel_sizes})
        self.clamp = clamp
        self.current = self.kernel_sizes[0]  # set by every randomize

    def randomize(self, generator: torch.Generator) -> None:
        self.current = self.kernel_sizes[int(torch.randint(len(self.kernel_sizes), (), generator=generator))]
        self.active.reset(generator)

    @property
    def active(self) -> BayesConv2d:
        return self.convs[str(self.current)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.active(x)
        if self.clamp is not None:
            out = out.clamp(*self.clamp)
        return out, self.active.kl()


class BayesAugmenter(nn.Module):
    """ABA's augmentation network: `depth` hidden multi-scale Bayesian layers and a clamped final one."""

    def __init__(self, channels: int, hidden: int = 18, depth: int = 4, kernel_sizes: Sequence[int] = (1, 3, 5, 7),
                 clamp: bool = True):
        super().__init__()
        width = hidden if depth else channels
        self.blocks = nn.ModuleList(
            MultiScaleBayesConv(channels if i == 0 else hidden, hidden, kernel_sizes, bias=True) for i in range(depth))
        self.final = MultiScaleBayesConv(width, channels, kernel_sizes, bias=False,
                                         clamp=CLAMP_RANGE if clamp else None)

    def layers(self) -> list[MultiScaleBayesConv]:
        return [*self.blocks, self.final]

    def randomize(self, generator: torch.Generator) -> None:
        for layer in self.layers():
            layer.randomize(generator)

    def active_parameters(self, which: str) -> list[nn.Parameter]:
        """The parameters of the convolutions in use: of the final layer ("final") or of every layer ("all")."""
        layers = [self.final] if which == "final" else self.layers()
        return [p for layer in layers for p in layer.active.parameters()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros((), dtype=self.final.active.weight_mu.dtype)
        for block in self.blocks:
            x, kl = block(x)
            x = F.leaky_relu(x, LEAKY_SLOPE)
            total = total + kl
        x, kl = self.final(x)
        return x, total + kl


def adversarial_loss(ce: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """What the augmenter's optimiser minimises: −CE − β·KL (an ascent on the classifier's loss and on the KL)."""
    return -at_least_fp32(ce) - beta * at_least_fp32(kl)


def _kl_to_mixture(p: torch.Tensor, log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    # Σ p (log p − log m), summed over rows (the caller divides by the batch size). log p comes from log_softmax:
    # where a float32 softmax underflows to exactly 0 (a logit gap over ~104), xlogy(p, p)'s gradient is 0/0 = NaN
    # (and so is KLDivLoss's, the reference's); p·log_softmax has the same value and the gradient's true limit, 0.
    return (p * (log_p - log_m)).sum()


def consistency_loss(logits: torch.Tensor, logits_r: torch.Tensor, logits_g: torch.Tensor, wr: float = 1.0,
                     temperature: float = 1.0) -> torch.Tensor:
    """ABA's consistency term between the clean view and the two augmented views (module docstring)."""
    n = logits.shape[0]
    if n == 0:
        return at_least_fp32(logits.sum() + logits_r.sum() + logits_g.sum()) * 0.0
    log_p = at_least_fp32(logits).log_softmax(1)
    log_r = at_least_fp32(logits_r).log_softmax(1)
    log_g = (at_least_fp32(logits_g) / temperature).log_softmax(1)
    p, p_r, p_g = log_p.exp(), log_r.exp(), log_g.exp()
    log_m = ((p + wr * p_r + (2 - wr) * p_g) / 3).clamp(MIX_FLOOR, 1.0).log()
    terms = (_kl_to_mixture(p, log_p, log_m) + wr * _kl_to_mixture(p_r, log_r, log_m)
             + (2 - wr) * _kl_to_mixture(p_g, log_g, log_m))
    return terms / (3 * n)
