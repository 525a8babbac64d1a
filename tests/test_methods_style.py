"""MixStyle, DSU and AdvStyle as methods: placement, multi-plate requests, adversary loop, TTA prediction."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers_methods_b import TASK, bit_identical, network_state, plate_batch, plates
from platebench.methods import Batch, MethodError, get_method
from platebench.methods.blocks import bn
from platebench.methods.blocks.style import pinned
from platebench.methods.network import masked_cross_entropy


def _make(name, **hp):
    torch.manual_seed(0)
    return get_method(name)(TASK, hp, "resnet-tiny")


def _without_inserts(method):
    plain = copy.deepcopy(method.network)
    for point in list(plain.featurizer.inserts):
        del plain.featurizer.inserts[point]  # set_insert(p, None) fails: ModuleDict.pop takes no default
    return plain


@pytest.mark.parametrize("name,points", [("mixstyle", ["res1", "res2", "res3"]),
                                         ("dsu", ["stem", "res1", "res2", "res3", "res4"])])
def test_style_methods_place_layers_request_plates_and_predict_like_the_bare_network(name, points):
    method = _make(name, plates_per_step=4, batch_size=32, p=1.0)
    assert sorted(method.network.featurizer.inserts) == sorted(points)
    request = method.data_request()
    assert (request.plates_per_step, request.batch_size, request.plate_pure) == (4, 32, True)  # per plate
    method.train()
    metrics = method.training_step(plates(0, 1, 2, 3))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    method.eval()
    batch = plate_batch(4)
    with torch.no_grad():
        assert torch.equal(method.predict(batch), _without_inserts(method).eval()(batch.images))


def test_style_methods_reject_bad_hyperparameters():
    with pytest.raises(MethodError, match="'res7'"):
        _make("dsu", layers="res1,res7")
    with pytest.raises(MethodError, match="'sideways'"):
        _make("mixstyle", mix="sideways")
    with pytest.raises(MethodError, match="plates_per_step"):
        _make("mixstyle", plates_per_step=0)
    with pytest.raises(MethodError, match="unknown hyperparameter 'alpah'"):
        _make("mixstyle", alpah=0.2)
    with pytest.raises(MethodError, match="'plates_per_step'.*got 3"):
        _make("mixstyle", mix="crossdomain", plates_per_step=3)
    with pytest.raises(MethodError, match="'inner_branch'.*'sometimes'"):
        _make("advstyle", inner_branch="sometimes")
    with pytest.raises(MethodError, match="'freeze_bn_in_inner'.*'maybe'"):
        _make("advstyle", freeze_bn_in_inner="maybe")
    with pytest.raises(MethodError, match="'detach_spread'.*'perhaps'"):
        _make("dsu", detach_spread="perhaps")
    for name in ("dsu", "mixstyle", "advstyle"):
        with pytest.raises(MethodError, match="'eps'.*-1"):
            _make(name, eps=-1.0)
    with pytest.raises(MethodError, match="'alpha'.*got 0.0"):
        _make("mixstyle", alpha=0.0)


def test_mixstyle_crossdomain_sees_the_plate_of_every_row_during_the_step():
    # crossdomain pairs the first half of the step's plates with the second half, so plates_per_step is even
    method = _make("mixstyle", mix="crossdomain", p=1.0, plates_per_step=4, batch_size=12)
    seen = []
    method.style_layers[0].register_forward_pre_hook(lambda m, args: seen.append(m.groups.clone()))
    method.train()
    method.training_step(plates(0, 3, 5, 1, n=4))
    assert torch.equal(seen[0], torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4))
    assert method.style_layers[0].groups is None


# ---- AdvStyle ------------------------------------------------------------------------------------------
def _adv_loss(method, batch, noise):
    """CE with every layer on the adversarial branch and fixed noise, BN on batch statistics."""
    with pinned(method.style_layers, branch="adv"), bn.batch_stats(method.network), torch.no_grad():
        for layer, (e_mu, e_sigma) in zip(method.style_layers, noise):
            layer.pin(eps_mu=e_mu, eps_sigma=e_sigma)
        return float(masked_cross_entropy(method.network(batch.images), batch.labels, batch.labels >= 0))


@pytest.mark.parametrize("hp", [{}, {"freeze_bn_in_inner": True}, {"inner_branch": "adv"}],
                         ids=["default", "freeze_bn_in_inner", "inner_branch_adv"])
def test_advstyle_inner_step_increases_the_loss_and_leaves_the_network_weights_bit_identical(hp):
    method = _make("advstyle", lr=1e-3, adv_weight=1.0, **hp)
    method.train()
    batch = Batch.concat(plates(0, 1))
    channels = [16, 16, 32, 64, 128]
    g = torch.Generator().manual_seed(5)
    noise = [(torch.randn(16, c, 1, 1, generator=g), torch.randn(16, c, 1, 1, generator=g)) for c in channels]
    before_loss = _adv_loss(method, batch, noise)  # also initialises θ
    theta_before = [layer.theta_mu.detach().clone() for layer in method.style_layers]
    frozen = {k: v for k, v in network_state(method.network).items() if "theta" not in k}
    # The default (reference) inner step picks each layer's branch at random: pin the adversarial one here to
    # compare losses; inner_branch="adv" pins it itself.
    forced = contextlib.nullcontext() if hp.get("inner_branch") == "adv" else pinned(method.style_layers, branch="adv")
    with forced:
        assert method.adversary_step(batch) == pytest.approx(before_loss, rel=1e-5)
    after = {k: v for k, v in network_state(method.network).items() if "theta" not in k}
    weights = {k for k, _ in method.network.named_parameters() if "theta" not in k}
    assert bit_identical({k: frozen[k] for k in weights}, {k: after[k] for k in weights})
    running = [k for k in frozen if "running_" in k]
    if hp.get("freeze_bn_in_inner"):
        assert bit_identical(frozen, after)  # the option: every BN buffer bit-identical too
    else:
        # the reference keeps BN in train mode during the inner steps: running statistics move
        assert running and all(not torch.equal(frozen[k], after[k]) for k in running)
    assert _adv_loss(method, batch, noise) > before_loss
    assert all(not torch.equal(t, layer.theta_mu) for t, layer in zip(theta_before, method.style_layers))


def test_advstyle_outer_step_updates_the_network_but_not_theta():
    method = _make("advstyle", inner_steps=0)
    for layer in method.style_layers:
        layer.pin(branch="adv")
    method.train()
    method.training_step(plates(0, 1))  # initialises θ
    theta = [layer.theta_sigma.detach().clone() for layer in method.style_layers]
    conv = method.network.featurizer.conv1.weight.detach().clone()
    method.training_step(plates(2, 3))
    assert all(torch.equal(t, layer.theta_sigma) for t, layer in zip(theta, method.style_layers))
    assert not torch.equal(conv, method.network.featurizer.conv1.weight)
    assert len(method.optimizers) == 2


def test_advstyle_tta_predicts_with_the_batch_statistics_without_touching_buffers():
    tta, std = _make("advstyle+tta"), _make("advstyle")
    assert (tta.track, std.track) == ("tta", "standard")
    for m in (tta, std):
        m.train()
        m.training_step(plates(0, 1))
        m.eval()
    a, b = plate_batch(2, seed=1), plate_batch(3, seed=2, shift=2.0)
    mixed = Batch.concat([a.select(torch.arange(8) < 1), b.select(torch.arange(8) >= 1)])
    buffers = network_state(tta.network)
    with torch.no_grad():
        assert not torch.allclose(tta.predict(a)[0], tta.predict(mixed)[0])  # depends on the other rows
        assert torch.allclose(std.predict(a)[0], std.predict(mixed)[0], atol=1e-5)  # does not
        reference = copy.deepcopy(tta.network).train()
        reference.featurizer.inserts.eval()  # BN on batch statistics, style layers off
        assert torch.allclose(tta.predict(a), reference(a.images), atol=1e-5)
    assert bit_identical(buffers, network_state(tta.network))
