"""ABRA (methods/abra.py): the paper's recipe as defaults, CutMix, our additions switched off, the loops, TTA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_methods_b import TASK, bit_identical, network_state, plate_batch
from platebench.harness.data.augment import AUGMENT_POLICIES, dihedral, random_resized_crop
from platebench.harness.train.schedule import lr_factor
from platebench.methods import Batch, MethodError, get_method
from platebench.methods.base import queries_with_labels
from platebench.methods.blocks.cutmix import MixedTargets
from platebench.methods.blocks.divergence import js_divergence_logits
from platebench.methods.blocks.style import batch_stats


def _abra(name="abra", **hp):
    torch.manual_seed(0)
    return get_method(name)(TASK, hp, "resnet-tiny").train()


def _abra_fixed(name="abra", scale=0.5, **hp):
    """An ABRA on across-plate scales already estimated as s = `scale` in every channel."""
    method = _abra(name, stats_scale="plates", **hp)
    layer = method.abra
    layer.m2_mu.fill_(scale**2)
    layer.m2_sigma.fill_(scale**2)
    layer.steps_seen.fill_(1)
    return method


def _fmap_and_targets(method, seed=0):
    batch = plate_batch(0, n=8, seed=seed)
    with torch.no_grad():
        fmap = method.trunk(batch.images)
    return batch, fmap, MixedTargets.hard(batch.labels), queries_with_labels(batch)


def _pin_noise(method, seed=1, zero=False):
    g = torch.Generator().manual_seed(seed)
    c = method.abra.channels
    eps = [torch.zeros(c) if zero else torch.randn(c, generator=g) for _ in range(2)]
    method.abra.pin(eps_mu=eps[0], eps_sigma=eps[1])


def _mean_shift(method, fmap):
    """Pooled perturbed minus pooled clean embedding (with a_σ = 0 the same vector δ_μ for every row)."""
    with torch.no_grad():
        shift = method.featurizer.pool(method.abra(fmap)) - method.featurizer.pool(fmap)
    assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)
    return shift[0]


# ---- the paper's recipe --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["abra", "abra+tta"])
def test_defaults_are_the_papers_recipe_and_our_additions_are_off_or_minimal(name):
    cls = get_method(name)
    recipe = {"optimizer": "adam", "batch_size": 128, "epochs": 100, "warmup_epochs": 10,
              "augment": "flip-rot90-crop", "insert_at": "res4"}
    ours = {"stats_scale": "batch", "stats_warmup_steps": 0, "project": True, "direction_norm": "unit",
            "sigma_floor": 0.0, "detach_stats": False, "js_stop_grad_clean": False}
    defaults = cls.all_defaults()
    assert {k: defaults[k] for k in {**recipe, **ours}} == {**recipe, **ours}
    assert 0.0 < defaults["cutmix_prob"] <= 1.0  # CutMix on
    method = _abra(name)
    assert method.data_request().batch_size == 128 and method.data_request().plate_pure
    assert AUGMENT_POLICIES[defaults["augment"]] == (random_resized_crop, dihedral)  # crop, 90° turns, flips
    assert isinstance(method.optimizers[0], torch.optim.Adam) and method.abra.channels == method.featurizer.out_dim
    steps = 7  # linear warm-up over the first 10 epochs: the peak lr on the 10th epoch's last step, then decay
    factors = [lr_factor(e, i, steps, defaults["epochs"], defaults["warmup_epochs"], defaults["schedule"])
               for e in (0, 9, 10) for i in (0, steps - 1)]
    assert factors[:5] == pytest.approx([1 / 70, 7 / 70, 64 / 70, 1.0, 1.0]) and factors[5] < 1.0


def _capture_trunk_input(method):
    seen = []
    method.featurizer.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_default_cutmix_pastes_a_same_plate_partner_and_weights_labels_by_the_pasted_area():
    method = _abra()
    reference = copy.deepcopy(method)  # the network before the step, for an independent loss
    batch = plate_batch(0, n=8, n_controls=2)
    seen = _capture_trunk_input(method)
    torch.manual_seed(5)
    metrics = method.training_step(batch)
    (mixed,) = seen
    images, labelled = batch.images, queries_with_labels(batch)
    assert torch.equal(mixed[~labelled], images[~labelled])  # controls neither receive nor (below) give pixels
    changed = (mixed != images).any(1)  # [B, H, W]
    box = changed.any(0)
    assert bool((box == box.any(1)[:, None] & box.any(0)[None, :]).all())  # one rectangle for the batch
    area = float(box.float().mean())
    assert 0.0 < area < 1.0
    rows = labelled.nonzero().flatten().tolist()
    partners = []
    for i in rows:
        assert torch.equal(mixed[i][:, ~box], images[i][:, ~box])
        match = [j for j in range(len(batch)) if torch.equal(mixed[i][:, box], images[j][:, box])]
        assert len(match) == 1 and match[0] in rows  # exactly one labelled partner
        assert batch.domains["plate"][match[0]] == batch.domains["plate"][i]
        partners.append(match[0])
    assert partners != rows  # some image really was mixed with another one
    with torch.no_grad():
        logits = method.hparams["arcface_scale"] * reference.head(reference.featurizer(mixed))
    y, y_partner = batch.labels[rows], batch.labels[partners]
    expected = ((1 - area) * F.cross_entropy(logits[rows], y, reduction="none")
                + area * F.cross_entropy(logits[rows], y_partner, reduction="none")).mean()
    assert metrics["ce_clean"] == pytest.approx(float(expected), rel=1e-5)


def test_cutmix_off_trains_on_the_batch_as_is():
    method = _abra(cutmix_prob=0.0)
    reference = copy.deepcopy(method)
    batch = plate_batch(0)
    seen = _capture_trunk_input(method)
    metrics = method.training_step(batch)
    assert torch.equal(seen[0], batch.images)
    with torch.no_grad():
        logits = method.hparams["arcface_scale"] * reference.head(reference.featurizer(batch.images))
    assert metrics["ce_clean"] == pytest.approx(float(F.cross_entropy(logits, batch.labels)), rel=1e-5)


# ---- the perturbation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["structured", "simple"])
def test_zero_magnitude_leaves_features_unchanged_and_js_zero(variant):
    method = _abra(variant=variant)
    _, fmap, _, _ = _fmap_and_targets(method)
    with torch.no_grad():
        for magnitude in method.abra.magnitudes():
            magnitude.zero_()
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
        new_sigma = (sigma + d_sigma).clamp_min(0.0)
        expected = new_sigma / sigma * (method.featurizer.pool(fmap) - mu) + mu + d_mu
    assert not torch.allclose(z_pert, method.featurizer.pool(fmap), atol=1e-3)  # a real perturbation
    assert torch.allclose(z_pert, expected, atol=1e-5)


def test_batch_scale_is_the_current_batchs_spread_of_image_statistics_and_has_no_history():
    method = _abra()  # stats_scale "batch": the EMA off
    layer = method.abra
    _, fmap, _, _ = _fmap_and_targets(method)
    _, other, _, _ = _fmap_and_targets(method, seed=3)
    image_mu = fmap.mean(dim=(2, 3))
    image_sigma = (fmap.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt()
    want_mu, want_sigma = ((s.var(dim=0) + 1e-5).sqrt() for s in (image_mu, image_sigma))
    for _ in range(3):
        layer.update_stats(other * 5 + 2)  # any history
    s_mu, s_sigma = layer.scales(fmap)
    assert torch.allclose(s_mu, want_mu, atol=1e-5) and torch.allclose(s_sigma, want_sigma, atol=1e-5)
    with torch.no_grad():  # the perturbation is in these units: ε = 0, a_σ = 0, d_μ = e_k → shift a_μ·s_μ[k]
        layer.a_sigma.zero_()
        layer.d_mu.copy_(torch.nn.functional.one_hot(torch.tensor(3), layer.channels).float())
    _pin_noise(method, zero=True)
    shift = _mean_shift(method, fmap)
    assert float(shift[3]) == pytest.approx(0.5 * float(want_mu[3]), rel=1e-4)
    assert float(shift.abs().sum() - shift[3].abs()) == pytest.approx(0.0, abs=1e-6)


def test_plates_scale_is_the_across_plate_ema_of_batch_statistics():
    torch.manual_seed(0)
    method = get_method("abra")(TASK, {"stats_scale": "plates", "stats_warmup_steps": 1, "stats_momentum": 0.1},
                                "resnet-tiny")
    layer = method.abra
    f1, f2 = torch.randn(4, layer.channels, 2, 2), torch.randn(4, layer.channels, 2, 2) * 3 + 1
    layer.update_stats(f1)
    assert not layer.active and float(layer.scales(f2)[0].max()) == 0.0
    layer.update_stats(f2)
    mu1, mu2 = batch_stats(f1, 1e-5)[0].flatten(), batch_stats(f2, 1e-5)[0].flatten()
    assert layer.active
    assert torch.allclose(layer.scales(f1)[0], 0.3 * (mu1 - mu2).abs(), atol=1e-4)  # √(0.1·0.9)·|Δμ|


def test_warmup_off_perturbs_from_the_first_step_and_on_trains_exactly_like_no_perturbation():
    assert "js" in _abra().training_step(plate_batch(0))  # default: no warm-up
    warm = _abra(stats_warmup_steps=2, cutmix_prob=0.0)
    never = _abra(apply_prob=0.0, cutmix_prob=0.0)
    for step in range(2):
        metrics = [m.training_step(plate_batch(step)) for m in (warm, never)]
        assert "js" not in metrics[0] and metrics[0] == metrics[1]
    assert bit_identical(network_state(warm), network_state(never))
    assert "js" in warm.training_step(plate_batch(2))


@pytest.mark.parametrize("direction", ["unit", "sqrt_c"])
def test_direction_norm_sets_the_length_of_the_learned_direction_and_nothing_else(direction):
    method = _abra_fixed(direction_norm=direction)
    _, fmap, _, _ = _fmap_and_targets(method)
    with torch.no_grad():
        method.abra.a_sigma.zero_()
    _pin_noise(method, zero=True)
    shift = _mean_shift(method, fmap)
    root_c = math.sqrt(method.abra.channels) if direction == "sqrt_c" else 1.0
    assert float(shift.norm()) == pytest.approx(0.5 * 0.5 * root_c, rel=1e-4)  # a_μ · s · ‖r·d̂‖
    d_hat = method.abra.d_mu.detach() / method.abra.d_mu.detach().norm()
    assert torch.allclose(shift / shift.norm(), d_hat, atol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_sigma_floor_only_acts_where_the_perturbed_std_falls_below_it(floor):
    method = _abra_fixed(scale=1.0, sigma_floor=floor)
    _, fmap, _, _ = _fmap_and_targets(method)
    layer = method.abra
    sigma = batch_stats(fmap, layer.eps)[1].flatten()
    drop = torch.where(torch.arange(layer.channels) % 2 == 0, torch.tensor(3.0), torch.tensor(0.2))
    with torch.no_grad():
        layer.a_mu.zero_()
        layer.a_sigma.fill_(1.0)
        layer.d_sigma.zero_()  # δ_σ = s·ε_σ = −drop·σ
    layer.pin(eps_mu=torch.zeros(layer.channels), eps_sigma=-drop * sigma)
    with torch.no_grad():
        out_std = layer(fmap).std(dim=(0, 2, 3), unbiased=False)
    raw_std = fmap.std(dim=(0, 2, 3), unbiased=False)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    assert torch.allclose(out_std[odd], 0.8 * raw_std[odd], rtol=1e-4, atol=1e-6)  # σ' = 0.8σ: no floor reached
    assert torch.allclose(out_std[even], floor * raw_std[even], rtol=1e-4, atol=1e-6)  # σ' = max(−2σ, floor·σ)


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


# ---- the loops ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("insert_at", ["res4", "res3"])
def test_one_ascent_step_increases_the_adversarial_loss_and_freezes_the_network(insert_at):
    method = _abra(step_size=0.01, ascent_steps=1, insert_at=insert_at)
    _, fmap, targets, mask = _fmap_and_targets(method)
    _pin_noise(method)

    def adv_loss():
        with torch.no_grad():
            return float(method.adversarial_loss(method.perturbed_cos(fmap), targets, mask))

    before, frozen = adv_loss(), network_state(method, exclude=("abra.",))
    phi = [p.detach().clone() for p in method.abra.parameters()]
    assert method.ascend(fmap, targets, mask) == pytest.approx(before, rel=1e-6)
    assert adv_loss() > before
    assert bit_identical(frozen, network_state(method, exclude=("abra.",)))  # weights and BN buffers
    assert any(not torch.equal(a, b) for a, b in zip(phi, method.abra.parameters()))
    assert all(p.grad is None for p in method.network_parameters())


@pytest.mark.parametrize("variant", ["structured", "simple"])
def test_projection_bounds_the_magnitudes_and_switched_off_changes_nothing_inside_the_bound(variant):
    def ascended(project, step_size):
        method = _abra(variant=variant, project=project, step_size=step_size, ascent_steps=4, a_max=2.0)
        _, fmap, targets, mask = _fmap_and_targets(method)
        _pin_noise(method)
        method.ascend(fmap, targets, mask)
        return torch.cat([m.detach().flatten() for m in method.abra.magnitudes()]), method

    bounded, _ = ascended(True, 1e3)
    assert bool(((bounded >= 0) & (bounded <= 2.0)).all())
    assert bool(((bounded == 0) | (bounded == 2.0)).any())  # a step this large must hit the boundary
    free, _ = ascended(False, 1e3)
    assert bool(((free < 0) | (free > 2.0)).any())  # unconstrained
    small_on, on = ascended(True, 1e-3)
    small_off, off = ascended(False, 1e-3)
    assert not torch.allclose(small_on, torch.full_like(small_on, 0.5))  # the small steps did move φ
    assert bit_identical(network_state(on.abra), network_state(off.abra))


def test_training_step_runs_the_backbone_once_even_with_several_ascent_steps():
    method = _abra(ascent_steps=3)
    calls = []
    method.featurizer.conv1.register_forward_hook(lambda *_: calls.append(1))
    ascents = []
    method.ascent_optimizer.register_step_post_hook(lambda *_: ascents.append(1))
    metrics = method.training_step(plate_batch(0))
    assert (len(calls), len(ascents)) == (1, 3)
    assert {"js", "ce_pert", "adv_loss"} <= set(metrics)


def test_away_from_res4_bn_buffers_follow_the_clean_branch_only():
    method = _abra(insert_at="res3", cutmix_prob=0.0, ascent_steps=2)
    assert method.abra.channels == 64  # resnet-tiny after res3
    reference = copy.deepcopy(method)
    batch = plate_batch(0)
    assert "js" in method.training_step(batch)
    with torch.no_grad():
        reference.featurizer(batch.images)  # one clean train-mode forward
    buffers = {k: v for k, v in method.featurizer.named_buffers()}
    assert bit_identical(buffers, {k: v for k, v in reference.featurizer.named_buffers()})


def test_outer_step_with_a_heavy_js_weight_reduces_js_on_the_batch():
    method = _abra(js_weight=100.0, ascent_steps=0, lr=1e-4, arcface_in_outer=0.0, cutmix_prob=0.0)
    batch = plate_batch(0)
    _pin_noise(method)

    def js():
        reference = copy.deepcopy(method)  # forward in train mode without disturbing the method's BN buffers
        with torch.no_grad():
            fmap = reference.trunk(batch.images)
            s = reference.hparams["arcface_scale"]
            pert = reference.abra(fmap)
            return float(js_divergence_logits(s * reference.head_cos(fmap), s * reference.head_cos(pert)))

    before = js()
    method.training_step(batch)
    assert js() < before


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


@pytest.mark.parametrize("key,value,message", [
    ("variant", "fancy", "'variant' must be one of .* got 'fancy'"),
    ("stats_scale", "ema", "'stats_scale' must be one of .* got 'ema'"),
    ("direction_norm", "sqrt", "'direction_norm' must be one of .* got 'sqrt'"),
    ("insert_at", "res9", "'insert_at' must be one of .* got 'res9'"),
    ("sigma_floor", 1.0, "'sigma_floor' must be in \\[0, 1\\), got 1.0"),
    ("stats_momentum", 0.0, "'stats_momentum' must be in \\(0, 1\\], got 0.0"),
    ("cutmix_prob", 1.5, "'cutmix_prob' must be in \\[0, 1\\], got 1.5"),
    ("stats_warmup_steps", -1, "'stats_warmup_steps' must be >= 0, got -1"),
    ("a_init", 3.0, "a_init=3.0"),
    ("project", "maybe", "'project' needs a bool, got 'maybe'"),
    ("eta", 0.1, "unknown hyperparameter 'eta'"),
])
def test_bad_hyperparameters_are_named(key, value, message):
    with pytest.raises(MethodError, match=message):
        get_method("abra")(TASK, {key: value}, "resnet-tiny")


def test_unprojected_magnitudes_may_start_above_a_max():
    assert float(_abra(project=False, a_init=3.0).abra.a_mu.detach()) == 3.0


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
