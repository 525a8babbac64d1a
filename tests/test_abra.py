"""ABRA (reconstructed, methods-research §3.9): the perturbation, the ascent loop, the outer loss, TTA."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_methods_b import TASK, bit_identical, network_state, plate_batch
from platebench.methods import Batch, MethodError, get_method
from platebench.methods.base import queries_with_labels
from platebench.methods.blocks.cutmix import MixedTargets
from platebench.methods.blocks.divergence import js_divergence_logits
from platebench.methods.blocks.style import batch_stats


def _abra(name="abra", scale=0.5, **hp):
    """An ABRA whose across-plate scales are already estimated (s = `scale` in every channel)."""
    torch.manual_seed(0)
    method = get_method(name)(TASK, {"stats_warmup_steps": 1, **hp}, "resnet-tiny")
    layer = method.abra
    layer.m2_mu.fill_(scale**2)
    layer.m2_sigma.fill_(scale**2)
    layer.steps_seen.fill_(1)
    if layer.variant == "simple":
        layer.theta_mu.data.fill_(scale)
        layer.theta_sigma.data.fill_(scale)
    return method.train()


def _fmap_and_targets(method, seed=0):
    batch = plate_batch(0, n=8, seed=seed)
    with torch.no_grad():
        fmap = method.featurizer.feature_map(batch.images)
    return batch, fmap, MixedTargets.hard(batch.labels), queries_with_labels(batch)


def _pin_noise(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = method.abra.channels
    method.abra.pin(eps_mu=torch.randn(c, generator=g), eps_sigma=torch.randn(c, generator=g))


@pytest.mark.parametrize("variant", ["structured", "simple"])
def test_zero_magnitude_leaves_features_unchanged_and_js_zero(variant):
    method = _abra(variant=variant)
    batch, fmap, _, _ = _fmap_and_targets(method)
    with torch.no_grad():
        for name in ("a_mu", "a_sigma") if variant == "structured" else ("theta_mu", "theta_sigma"):
            getattr(method.abra, name).zero_()
        pert = method.abra(fmap)
        assert torch.equal(pert, fmap)
        s = method.hparams["arcface_scale"]
        js = js_divergence_logits(s * method.head_cos(fmap), s * method.head_cos(pert))
    assert float(js) == 0.0


def test_pooled_perturbed_embedding_is_a_batch_shared_affine_map_of_the_clean_one():
    method = _abra()
    _, fmap, _, _ = _fmap_and_targets(method)
    _pin_noise(method)
    with torch.no_grad():
        z_pert = method.featurizer.pool(method.abra(fmap))
        mu, sigma = (t.flatten() for t in batch_stats(fmap, method.abra.eps))
        d_mu, d_sigma = method.abra.shifts(fmap)
        new_sigma = torch.maximum(sigma + d_sigma, 1e-3 * sigma)
        expected = new_sigma / sigma * (method.featurizer.pool(fmap) - mu) + mu + d_mu
    assert not torch.allclose(z_pert, method.featurizer.pool(fmap), atol=1e-3)  # a real perturbation
    assert torch.allclose(z_pert, expected, atol=1e-5)


def test_module_is_identity_in_eval_and_prediction_ignores_abra_parameters():
    method = _abra()
    _, fmap, _, _ = _fmap_and_targets(method)
    method.eval()
    assert method.abra(fmap) is fmap
    batch = plate_batch(1)
    with torch.no_grad():
        before = method.predict(batch)
        method.abra.a_mu.fill_(2.0)
        method.abra.d_mu.mul_(-3.0)
        assert torch.equal(method.predict(batch), before)


def test_one_ascent_step_increases_the_adversarial_loss_and_freezes_the_network():
    method = _abra(step_size=0.01, ascent_steps=1)
    _, fmap, targets, mask = _fmap_and_targets(method)
    _pin_noise(method)

    def adv_loss():
        with torch.no_grad():
            return float(method.adversarial_loss(method.head_cos(method.abra(fmap)), targets, mask))

    before, frozen = adv_loss(), network_state(method, exclude=("abra.",))
    phi = [p.detach().clone() for p in method.abra.parameters()]
    assert method.ascend(fmap, targets, mask) == pytest.approx(before, rel=1e-6)
    assert adv_loss() > before
    assert bit_identical(frozen, network_state(method, exclude=("abra.",)))  # weights and BN buffers
    assert any(not torch.equal(a, b) for a, b in zip(phi, method.abra.parameters()))
    assert all(p.grad is None for p in method.network_parameters())


@pytest.mark.parametrize("variant", ["structured", "simple"])
def test_projection_keeps_the_uncertainty_bounded(variant):
    method = _abra(variant=variant, step_size=1e3, ascent_steps=4, a_max=2.0)
    _, fmap, targets, mask = _fmap_and_targets(method)
    method.ascend(fmap, targets, mask)
    layer = method.abra
    if variant == "structured":
        a = torch.stack([layer.a_mu, layer.a_sigma]).detach()
        assert bool(((a >= 0) & (a <= 2.0)).all())
        assert bool(((a == 0) | (a == 2.0)).any())  # a step this large must hit the boundary
    else:
        s_mu, s_sigma = layer.scales()
        for theta, s in ((layer.theta_mu, s_mu), (layer.theta_sigma, s_sigma)):
            assert bool(((theta >= 0) & (theta <= 2.0 * s + 1e-6)).all())


def test_training_step_runs_the_backbone_once_even_with_several_ascent_steps():
    method = _abra(ascent_steps=3)
    calls = []
    method.featurizer.conv1.register_forward_hook(lambda *_: calls.append(1))
    ascents = []
    method.ascent_optimizer.register_step_post_hook(lambda *_: ascents.append(1))
    metrics = method.training_step(plate_batch(0))
    assert (len(calls), len(ascents)) == (1, 3)
    assert {"js", "ce_pert", "adv_loss"} <= set(metrics)


def test_outer_step_with_a_heavy_js_weight_reduces_js_on_the_batch():
    method = _abra(js_weight=100.0, ascent_steps=0, lr=1e-4, arcface_in_outer=0.0)
    batch = plate_batch(0)
    _pin_noise(method)

    def js():
        reference = copy.deepcopy(method)  # forward in train mode without disturbing the method's BN buffers
        with torch.no_grad():
            fmap = reference.featurizer.feature_map(batch.images)
            s = reference.hparams["arcface_scale"]
            pert = reference.abra(fmap)
            return float(js_divergence_logits(s * reference.head_cos(fmap), s * reference.head_cos(pert)))

    before = js()
    method.training_step(batch)
    assert js() < before


def test_scales_are_the_across_plate_std_of_batch_statistics():
    torch.manual_seed(0)
    method = get_method("abra")(TASK, {"stats_warmup_steps": 2, "stats_momentum": 0.1}, "resnet-tiny")
    layer = method.abra
    f1, f2 = torch.randn(4, layer.channels, 2, 2), torch.randn(4, layer.channels, 2, 2) * 3 + 1
    layer.update_stats(f1)
    assert not layer.active and float(layer.scales()[0].max()) == 0.0
    layer.update_stats(f2)
    mu1, mu2 = batch_stats(f1, 1e-5)[0].flatten(), batch_stats(f2, 1e-5)[0].flatten()
    assert layer.active
    assert torch.allclose(layer.scales()[0], 0.3 * (mu1 - mu2).abs(), atol=1e-4)  # √(0.1·0.9)·|Δμ|


def test_no_perturbation_before_warmup_and_simple_theta_starts_at_the_scales():
    torch.manual_seed(0)
    method = get_method("abra")(TASK, {"stats_warmup_steps": 2, "variant": "simple"}, "resnet-tiny").train()
    first = method.training_step(plate_batch(0))
    assert "js" not in first
    second = method.training_step(plate_batch(1, shift=1.0))
    assert "js" in second
    s_mu, _ = method.abra.scales()
    assert float(s_mu.max()) > 0


def test_apply_decision_depends_on_the_step_counter_only():
    method = _abra(apply_prob=0.5)
    decisions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        row = []
        for step in range(1, 30):
            method.abra.steps_seen.fill_(step)
            row.append(method._perturb_this_step())
        decisions.append(row)
    assert decisions[0] == decisions[1]
    assert 0 < sum(decisions[0]) < 29


def test_bad_hyperparameters_are_named():
    with pytest.raises(MethodError, match="'fancy'"):
        get_method("abra")(TASK, {"variant": "fancy"}, "resnet-tiny")
    with pytest.raises(MethodError, match="a_init=3.0"):
        get_method("abra")(TASK, {"a_init": 3.0, "a_max": 2.0}, "resnet-tiny")
    with pytest.raises(MethodError, match="unknown hyperparameter 'eta'"):
        get_method("abra")(TASK, {"eta": 0.1}, "resnet-tiny")


def test_abra_tta_uses_batch_statistics_and_keeps_buffers():
    tta = _abra("abra+tta")
    tta.training_step(plate_batch(0))
    tta.eval()
    a, b = plate_batch(2, seed=1), plate_batch(3, seed=2, shift=2.0)
    mixed = Batch.concat([a.select(torch.arange(8) < 1), b.select(torch.arange(8) >= 1)])
    buffers = network_state(tta)
    with torch.no_grad():
        assert not torch.allclose(tta.predict(a)[0], tta.predict(mixed)[0])
        reference = copy.deepcopy(tta.featurizer).train()
        expected = tta.hparams["arcface_scale"] * tta.head(reference(a.images))
        assert torch.allclose(tta.predict(a), expected, atol=1e-4)
    assert bit_identical(buffers, network_state(tta))
    assert tta.track == "tta"
