"""Building blocks: ArcFace margins, JS divergence, gradient reversal, style layers, inner-loop contexts, CutMix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from platebench.methods import MethodError
from platebench.methods.backbones import build_backbone
from platebench.methods.blocks.cutmix import cutmix_within
from platebench.methods.blocks.divergence import js_divergence, js_divergence_logits
from platebench.methods.blocks.grl import GradientReversal, grad_reverse
from platebench.methods.blocks.inner_loop import frozen_parameters
from platebench.methods.blocks.margins import CosineHead, arcface_logits, arcface_loss, margin_target_cos
from platebench.methods.blocks.style import (
    AdvStyleLayer,
    DSULayer,
    MixStyleLayer,
    batch_spread,
    frozen_noise,
    insertion_channels,
    instance_stats,
    parse_insertion_points,
)
from scipy.spatial.distance import jensenshannon


def _cosines(n=12, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    w = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    return z @ w.T, labels


# ---- ArcFace ----------------------------------------------------------------------------------------
def test_arcface_with_zero_margin_is_cross_entropy_on_scaled_cosines():
    cos, labels = _cosines()
    assert torch.equal(arcface_loss(cos, labels, 0.0, 30.0), F.cross_entropy(30.0 * cos, labels))


def test_arcface_target_matches_cos_theta_plus_m_and_never_exceeds_plain_logit():
    cos, labels = _cosines(n=64)
    for m in (0.1, 0.3, 0.5, 1.0):
        logits = arcface_logits(cos, labels, m, 16.0)
        target, plain = logits.gather(1, labels[:, None]).squeeze(1), 16.0 * cos.gather(1, labels[:, None]).squeeze(1)
        assert bool((target <= plain).all())
        theta = torch.arccos(cos.gather(1, labels[:, None]).squeeze(1).double())
        ok = theta + m < math.pi
        assert torch.allclose(target[ok].double() / 16.0, torch.cos(theta[ok] + m), atol=1e-5)
        others = torch.ones_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], False)
        assert torch.equal(logits[others], 16.0 * cos[others])


def test_arcface_fallback_past_pi_is_monotone_form():
    m = 0.5
    c = torch.tensor([-0.99, -0.95])  # θ > π − m for both
    assert bool((c < math.cos(math.pi - m)).all())
    assert torch.allclose(margin_target_cos(c, m), c - m * math.sin(m))


def test_arcface_loss_is_monotone_non_decreasing_in_margin():
    cos, labels = _cosines(n=40, seed=3)
    cos = torch.cat([cos, -torch.ones(1, cos.shape[1]) * 0.999])  # a sample deep in the fallback region
    labels = torch.cat([labels, torch.tensor([0])])
    margins = np.linspace(0.0, 1.5, 31)
    losses = torch.stack([arcface_loss(cos, labels, float(m), 30.0, reduction="none") for m in margins])
    assert bool((losses[1:] >= losses[:-1] - 1e-6).all())
    assert bool((losses[-1] > losses[0]).all())


def test_arcface_gradient_is_finite_at_cos_plus_minus_one():
    cos = torch.tensor([[1.0, 0.2, -0.3], [0.1, -1.0, 0.4], [1.0, -1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    arcface_loss(cos, labels, 0.5, 64.0).backward()
    assert bool(torch.isfinite(cos.grad).all())


def test_cosine_head_outputs_cosines():
    head = CosineHead(6, 3)
    z = torch.randn(4, 6)
    cos = head(z)
    expected = F.cosine_similarity(z[:, None, :], head.weight[None, :, :], dim=2)
    assert torch.allclose(cos, expected, atol=1e-6)
    with pytest.raises(ValueError, match="-0.1"):
        margin_target_cos(cos[:, 0], -0.1)


# ---- Jensen-Shannon -----------------------------------------------------------------------------------
def test_js_matches_scipy_squared_distance_natural_log():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6), size=10), rng.dirichlet(np.ones(6), size=10)
    ours = js_divergence(torch.tensor(p), torch.tensor(q), reduction="none").numpy()
    ref = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    assert float(js_divergence(torch.tensor(p), torch.tensor(q))) == pytest.approx(ref.mean(), rel=1e-6)


def test_js_symmetric_zero_iff_equal_and_bounded_by_ln2():
    torch.manual_seed(0)
    a, b = torch.randn(16, 7).softmax(1), torch.randn(16, 7).softmax(1)
    assert torch.allclose(js_divergence(a, b, "none"), js_divergence(b, a, "none"), atol=1e-7)
    assert float(js_divergence(a, a)) == 0.0
    assert bool((js_divergence(a, b, "none") > 0).all())
    disjoint_p, disjoint_q = torch.eye(3)[[0, 1]], torch.eye(3)[[1, 2]]
    assert torch.allclose(js_divergence(disjoint_p, disjoint_q, "none"), torch.full((2,), math.log(2)))
    sharp = torch.randn(50, 4) * 30
    assert bool((js_divergence_logits(sharp, -sharp, "none") <= math.log(2) + 1e-6).all())
    with pytest.raises(ValueError, match="shapes differ"):
        js_divergence(a, b[:, :3])


# ---- gradient reversal -----------------------------------------------------------------------------------
def test_grl_is_identity_forward_and_negated_scaled_gradient_backward():
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.7 * upstream)
    layer = GradientReversal(1.0)
    layer.coeff = 2.5
    x.grad = None
    layer(x).backward(upstream)
    assert torch.allclose(x.grad, -2.5 * upstream)


# ---- style layers ----------------------------------------------------------------------------------------
@pytest.fixture
def fmap():
    torch.manual_seed(0)
    return torch.randn(6, 4, 5, 5) * 2 + torch.randn(6, 4, 1, 1)


@pytest.mark.parametrize("layer", [MixStyleLayer(p=1.0), DSULayer(p=1.0), AdvStyleLayer(4)])
def test_style_layers_are_exact_identities_in_eval_mode(layer, fmap):
    layer.eval()
    assert layer(fmap) is fmap


def test_style_layers_with_zero_probability_are_identities(fmap):
    for layer in (MixStyleLayer(p=0.0), DSULayer(p=0.0)):
        layer.train()
        assert layer(fmap) is fmap


def test_mixstyle_output_instance_means_are_the_mixed_means(fmap):
    layer = MixStyleLayer(p=1.0, alpha=0.3).train()
    lam = torch.rand(6, 1, 1, 1)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])
    layer.pin(lam=lam, perm=perm)
    out = layer(fmap)
    mu, _ = instance_stats(fmap, 1e-6)
    assert torch.allclose(out.mean((2, 3), keepdim=True), lam * mu + (1 - lam) * mu[perm], atol=1e-5)
    layer.pin(lam=torch.ones(6, 1, 1, 1))
    assert torch.allclose(layer(fmap), fmap, atol=1e-5)


def test_mixstyle_no_gradient_flows_through_the_statistics(fmap):
    layer = MixStyleLayer(p=1.0).train()
    lam, perm = torch.rand(6, 1, 1, 1), torch.tensor([1, 0, 3, 2, 5, 4])
    layer.pin(lam=lam, perm=perm)
    x = fmap.clone().requires_grad_(True)
    weights = torch.randn_like(fmap)
    (layer(x) * weights).sum().backward()
    _, sigma = instance_stats(fmap, 1e-6)
    mixed_sigma = lam * sigma + (1 - lam) * sigma[perm]
    assert torch.allclose(x.grad, weights * mixed_sigma / sigma, atol=1e-5)  # stats treated as constants


def test_mixstyle_crossdomain_partners_come_from_another_group(fmap):
    layer = MixStyleLayer(p=1.0, mix="crossdomain").train()
    groups = torch.tensor([0, 0, 1, 2, 2, 3])  # two domains: groups {0, 1} (rows 0-2) and {2, 3} (rows 3-5)
    layer.set_groups(groups)
    for _ in range(20):
        partner = layer._partner(6, fmap.device)
        assert bool((groups[partner] != groups).all())
        assert bool(((partner >= 3) != (torch.arange(6) >= 3)).all())  # from the other half
        assert torch.equal(partner.sort().values, torch.arange(6))  # one-to-one: a permutation
    layer.set_groups(torch.tensor([0, 0, 0, 1, 1, 2]))  # three groups cannot be split into two domains
    with pytest.raises(ValueError, match="even number"):
        layer(fmap)
    layer.set_groups(None)
    with pytest.raises(ValueError, match="set_groups"):
        layer(fmap)
    with pytest.raises(ValueError, match="'nope'"):
        MixStyleLayer(mix="nope")


def test_dsu_with_zero_noise_returns_the_input(fmap):
    layer = DSULayer(p=1.0).train()
    layer.pin(eps_mu=torch.zeros(6, 4, 1, 1), eps_sigma=torch.zeros(6, 4, 1, 1))
    assert torch.allclose(layer(fmap), fmap, atol=1e-5)


def test_dsu_monte_carlo_instance_means_have_mean_mu_and_variance_sigma_mu_squared(fmap):
    torch.manual_seed(1)
    layer = DSULayer(p=1.0).train()
    with torch.no_grad():
        draws = torch.stack([layer(fmap).mean((2, 3)) for _ in range(3000)])  # [N, B, C]
    mu, _ = instance_stats(fmap, 1e-6)
    spread = batch_spread(mu, 1e-6).flatten()
    assert torch.allclose(draws.mean(0), mu.flatten(1), atol=4 * float(spread.max()) / math.sqrt(3000))
    ratio = draws.var(0) / spread.pow(2)[None, :]
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all())


def test_advstyle_initialises_theta_to_dsu_spread_and_reverses_its_gradient(fmap):
    layer = AdvStyleLayer(4, adv_weight=2.0).train()
    eps_mu, eps_sigma = torch.randn(6, 4, 1, 1), torch.randn(6, 4, 1, 1)
    layer.pin(branch="adv", eps_mu=eps_mu, eps_sigma=eps_sigma)
    weights = torch.randn_like(fmap)
    (layer(fmap) * weights).sum().backward()
    mu, sigma = instance_stats(fmap, 1e-6, unbiased=True)  # the reference's unbiased variance over (h, w)
    assert torch.allclose(layer.theta_mu.detach(), batch_spread(mu, 1e-6).flatten())
    assert bool(layer.initialized)
    # Reference gradient of the same loss without reversal, θ as a plain leaf.
    t_mu = layer.theta_mu.detach().clone().requires_grad_(True)
    t_sigma = layer.theta_sigma.detach().clone().requires_grad_(True)
    new_mu, new_sigma = mu + eps_mu * t_mu.view(1, -1, 1, 1), sigma + eps_sigma * t_sigma.view(1, -1, 1, 1)
    ((new_sigma * (fmap - mu) / sigma + new_mu) * weights).sum().backward()
    assert torch.allclose(layer.theta_mu.grad, -2.0 * t_mu.grad, atol=1e-4)
    assert torch.allclose(layer.theta_sigma.grad, -2.0 * t_sigma.grad, atol=1e-4)
    layer.pin(branch="identity")
    assert layer(fmap) is fmap


def test_frozen_noise_replays_draws_and_keeps_earlier_pins(fmap):
    layer = DSULayer(p=1.0).train()
    layer.pin(apply=True)
    with frozen_noise(layer):
        first, second = layer(fmap), layer(fmap)
    assert torch.equal(first, second)
    assert not torch.equal(layer(fmap), first)
    assert layer._pinned == {"apply": True}


# ---- inner-loop contexts ----------------------------------------------------------------------------------
def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_parameters_gives_no_gradients_and_restores_flags():
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    with frozen_parameters(lin.parameters()):
        out = lin(torch.randn(4, 3, requires_grad=True)).sum()
        out.backward()
        assert lin.weight.grad is None
    assert lin.weight.requires_grad and not lin.bias.requires_grad


def test_insertion_channels_of_resnet_tiny_and_no_buffer_change():
    net = build_backbone("resnet-tiny", 5).train()
    before = _bn_state(net)
    assert insertion_channels(net, 5) == {"stem": 16, "res1": 16, "res2": 32, "res3": 64, "res4": 128}
    assert net.training and all(torch.equal(v, _bn_state(net)[k]) for k, v in before.items())
    with pytest.raises(MethodError, match="'res1,res9'"):
        parse_insertion_points("mixstyle", "res1,res9")


# ---- CutMix -----------------------------------------------------------------------------------------------
def test_cutmix_pastes_one_partner_box_and_lambda_is_the_kept_area():
    torch.manual_seed(3)
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 8, 8).clone()
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    eligible = labels >= 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        mixed, targets = cutmix_within(images, labels, eligible, generator=g)
        assert torch.equal(mixed[5], images[5])  # ineligible row untouched
        pasted = (mixed != images).any(1)  # [B, H, W]
        for i in range(5):
            partner = int(targets.partner_labels[i])
            assert partner in range(5)
            patch = mixed[i][:, pasted[i]]
            assert bool((patch == partner).all())
            if partner != i:  # the pasted area is the box, and λ is the area kept
                assert int(pasted[i].sum()) == round((1 - targets.lam) * 64)
    logits = torch.randn(6, 5)
    mask = eligible
    loss = targets.loss(lambda o, y: F.cross_entropy(o, y, reduction="none"), logits, mask)
    expected = targets.lam * F.cross_entropy(logits[mask], labels[mask]) + (1 - targets.lam) * F.cross_entropy(
        logits[mask], targets.partner_labels[mask])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
