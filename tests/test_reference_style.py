"""MixStyle, DSU and AdvStyle against their official code's equations (issue 12: faithful methods).

Each test feeds identical inputs and identical random draws (pinned, or drawn from a shared seed) to the
project's layer and to a short re-derivation of the reference's equations written here, then compares the
outputs and the input gradients (of a fixed random projection of the output) in float64. The references:
lixiaotong97/DSU (`DistributionUncertainty`), KaiyangZhou/mixstyle-release (`MixStyle`), YBZh/AdvStyle
(`AdvStyle` layer, the `Vanilla2_advstyle` trainer and its adversary optimiser from `build_optimizer_advstle`).
Options that deliberately differ from the reference get a test that names the option and shows the difference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_methods_b import TASK, network_state, plates
from platebench.methods import Batch, get_method
from platebench.methods.blocks.style import AdvStyleLayer, DSULayer, MixStyleLayer, instance_stats

EPS = 0.05  # large against the features' variance, so that the variance convention (÷ n vs ÷ n − 1) shows
TOL = {"atol": 1e-5, "rtol": 1e-5}
B, C, H, W = 8, 4, 6, 5


# ---- the reference's equations ------------------------------------------------------------------------
def ref_instance_stats(x):
    """Mean over (h, w) and √(var + ε) with torch's default variance, i.e. divided by h·w − 1."""
    n = x.shape[2] * x.shape[3]
    mu = x.sum((2, 3), keepdim=True) / n
    var = ((x - mu) ** 2).sum((2, 3), keepdim=True) / (n - 1)
    return mu, (var + EPS).sqrt()


def ref_spread(stat):
    """DSU's Σ: √(var over the batch + ε), again divided by B − 1."""
    m = stat.mean(0, keepdim=True)
    return (((stat - m) ** 2).sum(0, keepdim=True) / (stat.shape[0] - 1) + EPS).sqrt()


def ref_dsu(x, e_mu, e_sigma, detach_spread=False):
    mu, sig = ref_instance_stats(x)
    s_mu, s_sig = ref_spread(mu), ref_spread(sig)
    if detach_spread:  # not the reference: what the project's option computes
        s_mu, s_sig = s_mu.detach(), s_sig.detach()
    beta, gamma = mu + e_mu * s_mu, sig + e_sigma * s_sig
    return (x - mu) / sig * gamma + beta


def ref_mixstyle(x, lam, perm):
    mu, sig = (s.detach() for s in ref_instance_stats(x))
    return (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]


def ref_crossdomain_perm(n, r_first, r_second):
    """Rows of the first half take the reversed second half shuffled by r_first, and vice versa (r_second)."""
    h = n // 2
    return torch.cat([(n - 1) - r_first, (h - 1) - r_second])


def ref_advstyle_adv(x, e_mu, e_sigma, theta_mu, theta_sigma):
    mu, sig = ref_instance_stats(x)
    return (x - mu) / sig * (sig + e_sigma * theta_sigma.view(1, -1, 1, 1)) + mu + e_mu * theta_mu.view(1, -1, 1, 1)


# ---- helpers ----------------------------------------------------------------------------------------------
def _fmap(seed=0, b=B, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, C, h, w, generator=g, dtype=torch.float64) * 0.3
            + torch.randn(b, C, 1, 1, generator=g, dtype=torch.float64))


def _noise(seed, shape=(B, C, 1, 1)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _record(layers, key, sink):
    """Append every value the layers draw (or replay) for `key` to `sink`."""
    for layer in layers:
        def draw(name, make, _draw=layer.draw):
            value = _draw(name, make)
            if name == key:
                sink.append(value)
            return value

        layer.draw = draw


def _out_and_grad(fn, x):
    """fn(x) and d<fn(x), P>/dx for a fixed random projection P."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * proj).sum(), x)
    return out.detach(), grad


def _assert_same(ours, ref, x):
    out_a, grad_a = _out_and_grad(ours, x)
    out_b, grad_b = _out_and_grad(ref, x)
    torch.testing.assert_close(out_a, out_b, **TOL)
    torch.testing.assert_close(grad_a, grad_b, **TOL)
    return grad_a, grad_b


# ---- DSU ----------------------------------------------------------------------------------------------------
def test_dsu_layer_equals_the_reference_output_and_input_gradient():
    x, (e_mu, e_sigma) = _fmap(), _noise(1)
    layer = DSULayer(p=1.0, eps=EPS).train()
    layer.pin(eps_mu=e_mu, eps_sigma=e_sigma)
    _assert_same(layer, lambda t: ref_dsu(t, e_mu, e_sigma), x)


def test_dsu_layer_draws_the_reference_noise_under_a_shared_seed():
    x = _fmap()
    layer = DSULayer(p=1.0, eps=EPS).train()
    layer.pin(apply=True)  # the reference's coin is numpy's; everything else is torch's, drawn in the same order
    torch.manual_seed(7)
    ours = layer(x)
    torch.manual_seed(7)
    e_mu, e_sigma = torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, dtype=torch.float64)
    torch.testing.assert_close(ours, ref_dsu(x, e_mu.view(B, C, 1, 1), e_sigma.view(B, C, 1, 1)), **TOL)


def test_dsu_option_detach_spread_keeps_the_output_and_changes_the_gradient():
    x, (e_mu, e_sigma) = _fmap(), _noise(1)
    default, detached = DSULayer(p=1.0, eps=EPS).train(), DSULayer(p=1.0, eps=EPS, detach_spread=True).train()
    for layer in (default, detached):
        layer.pin(eps_mu=e_mu, eps_sigma=e_sigma)
    out_ref, grad_ref = _out_and_grad(lambda t: ref_dsu(t, e_mu, e_sigma), x)
    out_d, grad_d = _out_and_grad(detached, x)
    torch.testing.assert_close(out_d, out_ref, **TOL)  # the reference's forward...
    assert float((grad_d - grad_ref).norm() / grad_ref.norm()) > 1e-3  # ...but not its gradient
    _assert_same(detached, lambda t: ref_dsu(t, e_mu, e_sigma, detach_spread=True), x)  # Σ constant instead


def test_dsu_method_passes_detach_spread_to_every_layer():
    torch.manual_seed(0)
    assert all(not layer.detach_spread for layer in get_method("dsu")(TASK, {}, "resnet-tiny").style_layers)
    method = get_method("dsu")(TASK, {"detach_spread": True}, "resnet-tiny")
    assert all(layer.detach_spread for layer in method.style_layers)


def test_instance_stats_on_a_one_by_one_map_fall_back_to_the_biased_variance():
    """Declared difference: the reference's unbiased variance of one pixel is NaN; ours is 0 (+ ε)."""
    x = _fmap(h=1, w=1)
    mu, sigma = instance_stats(x, EPS, unbiased=True)
    assert torch.equal(mu, x) and torch.allclose(sigma, torch.full_like(sigma, EPS ** 0.5))
    assert bool(torch.isnan(ref_instance_stats(x)[1]).all())
    layer = DSULayer(p=1.0, eps=EPS).train()
    assert bool(torch.isfinite(layer(x)).all())


# ---- MixStyle -----------------------------------------------------------------------------------------------
def test_mixstyle_random_equals_the_reference_output_and_input_gradient():
    x = _fmap()
    lam = torch.distributions.Beta(0.1, 0.1).sample((B, 1, 1, 1)).double()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    layer = MixStyleLayer(p=1.0, alpha=0.1, eps=EPS).train()
    layer.pin(lam=lam, perm=perm)
    _assert_same(layer, lambda t: ref_mixstyle(t, lam, perm), x)


@pytest.mark.parametrize("mix", ["random", "crossdomain"])
def test_mixstyle_draws_the_reference_lambda_and_partners_under_a_shared_seed(mix):
    x = _fmap()
    layer = MixStyleLayer(p=1.0, alpha=0.3, eps=EPS, mix=mix).train()
    layer.pin(apply=True)  # the reference's coin is Python's random; λ and the permutation are torch's
    layer.set_groups(torch.tensor([0] * (B // 2) + [1] * (B // 2)))  # two plates of B/2 rows: the two domains

    def reference(t):
        lam = torch.distributions.Beta(0.3, 0.3).sample((B, 1, 1, 1))
        if mix == "random":
            perm = torch.randperm(B)
        else:
            r_first = torch.randperm(B // 2)
            perm = ref_crossdomain_perm(B, r_first, torch.randperm(B // 2))
        return ref_mixstyle(t, lam, perm)

    def seeded(fn):
        return lambda t: (torch.manual_seed(11), fn(t))[1]

    _assert_same(seeded(layer), seeded(reference), x)


@pytest.mark.parametrize("groups", [[0] * 4 + [1] * 4, [0] * 2 + [1] * 2 + [2] * 2 + [3] * 2],
                         ids=["2 plates", "4 plates"])
def test_mixstyle_crossdomain_pairs_the_halves_of_the_plates_like_the_reference(groups):
    """With equal batches per plate the two halves of the step's plates are the reference's two row halves."""
    layer = MixStyleLayer(p=1.0, mix="crossdomain")
    layer.set_groups(torch.tensor(groups))
    for seed in range(10):
        torch.manual_seed(seed)
        ours = layer._partner(B, "cpu")
        torch.manual_seed(seed)
        r_first = torch.randperm(B // 2)
        assert torch.equal(ours, ref_crossdomain_perm(B, r_first, torch.randperm(B // 2)))
        assert torch.equal(ours.sort().values, torch.arange(B))  # a permutation
        assert bool(((ours >= B // 2) != (torch.arange(B) >= B // 2)).all())  # partner from the other half


def test_mixstyle_crossdomain_with_unequal_halves_reuses_the_other_half_evenly():
    """Declared difference: the reference cannot pair unequal halves (a plate's shorter last batch)."""
    layer = MixStyleLayer(p=1.0, mix="crossdomain")
    layer.set_groups(torch.tensor([0] * 6 + [1] * 2))
    for seed in range(10):
        torch.manual_seed(seed)
        partner = layer._partner(8, "cpu")
        assert bool((partner[:6] >= 6).all()) and torch.equal(torch.bincount(partner[:6], minlength=8)[6:],
                                                               torch.tensor([3, 3]))
        assert bool((partner[6:] < 6).all()) and partner[6] != partner[7]


def test_mixstyle_method_crossdomain_pairs_the_two_plates_one_to_one():
    torch.manual_seed(0)
    method = get_method("mixstyle")(TASK, {"mix": "crossdomain", "p": 1.0, "batch_size": 8}, "resnet-tiny")
    perms = []
    _record(method.style_layers, "perm", perms)
    method.train()
    method.training_step(plates(0, 1, n=8))
    assert len(perms) == len(method.style_layers)
    for perm in perms:
        assert torch.equal(perm.sort().values, torch.arange(16))
        assert bool(((perm >= 8) != (torch.arange(16) >= 8)).all())


# ---- AdvStyle -----------------------------------------------------------------------------------------------
def _adv_layer(adv_weight=2.0):
    return AdvStyleLayer(C, adv_weight=adv_weight, eps=EPS).double().train()


def test_advstyle_adversarial_branch_equals_the_reference_and_reverses_the_theta_gradient():
    x, (e_mu, e_sigma) = _fmap(), _noise(2)
    layer = _adv_layer(2.0)
    layer.pin(branch="adv", eps_mu=e_mu, eps_sigma=e_sigma)
    with torch.no_grad():
        layer(x)  # the first adversarial forward sets θ to the detached spread of its batch
    mu, sig = ref_instance_stats(x)
    torch.testing.assert_close(layer.theta_mu.detach(), ref_spread(mu).flatten(), **TOL)
    torch.testing.assert_close(layer.theta_sigma.detach(), ref_spread(sig).flatten(), **TOL)
    theta_mu, theta_sigma = layer.theta_mu.detach().clone(), layer.theta_sigma.detach().clone()
    _assert_same(layer, lambda t: ref_advstyle_adv(t, e_mu, e_sigma, theta_mu, theta_sigma), x)
    # θ's gradient: the reference's gradient-reversal layer gives −adv_weight × the plain gradient
    proj = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (layer(x) * proj).sum().backward()
    t_mu, t_sigma = theta_mu.clone().requires_grad_(True), theta_sigma.clone().requires_grad_(True)
    (ref_advstyle_adv(x, e_mu, e_sigma, t_mu, t_sigma) * proj).sum().backward()
    torch.testing.assert_close(layer.theta_mu.grad, -2.0 * t_mu.grad, **TOL)
    torch.testing.assert_close(layer.theta_sigma.grad, -2.0 * t_sigma.grad, **TOL)


def test_advstyle_dsu_and_identity_branches_equal_the_reference():
    x, (e_mu, e_sigma) = _fmap(), _noise(3)
    layer = _adv_layer()
    layer.pin(branch="dsu", eps_mu=e_mu, eps_sigma=e_sigma)
    _assert_same(layer, lambda t: ref_dsu(t, e_mu, e_sigma), x)  # Σ not detached in the reference's DSU branch
    layer.pin(branch="identity")
    assert layer(x) is x


def test_advstyle_picks_each_branch_with_probability_one_third():
    layer = _adv_layer()
    x = _fmap(b=2, h=2, w=2)
    seen = []
    _record([layer], "branch", seen)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(3000):
            layer(x)
    counts = {b: seen.count(b) for b in AdvStyleLayer.BRANCHES}
    assert all(abs(n / 3000 - 1 / 3) < 0.03 for n in counts.values()), counts


BRANCHES = ["adv", "dsu", "identity", "adv", "dsu"]  # one per layer (stem, res1..res4): every branch present


def _pin_draws(method, branches, seed=21):
    g = torch.Generator().manual_seed(seed)
    for layer, branch, c in zip(method.style_layers, branches, [16, 16, 32, 64, 128]):
        layer.pin(branch=branch, eps_mu=torch.randn(16, c, 1, 1, generator=g),
                  eps_sigma=torch.randn(16, c, 1, 1, generator=g))


def _reference_inner_step(model, batch, lr):
    """The reference trainer's adversary update: train-mode forward, CE, backward, an optimiser step on θ only."""
    theta = [p for n, p in model.named_parameters() if "theta" in n]
    optimizer = torch.optim.Adam(theta, lr=lr, weight_decay=1e-5)
    loss = F.cross_entropy(model(batch.images), batch.labels)
    optimizer.zero_grad()
    model.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _initialised(hp):
    torch.manual_seed(0)
    method = get_method("advstyle")(TASK, {"lr": 1e-2, **hp}, "resnet-tiny")
    method.train()
    batch = Batch.concat(plates(0, 1))
    method._initialize_theta(batch)
    return method, batch


def test_advstyle_inner_step_equals_the_reference_trainer_step():
    method, batch = _initialised({})
    reference = copy.deepcopy(method.network)
    before = network_state(method.network)
    _pin_draws(method, BRANCHES)
    for layer, mine in zip(reference.featurizer.inserts.values(), method.style_layers):
        layer.pin(**mine._pinned)
    ref_loss = _reference_inner_step(reference, batch, lr=1e-2)
    loss = method.adversary_step(batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    ours, ref = network_state(method.network), network_state(reference)
    for key in ours:  # θ after the ascent step, every weight, and the BN buffers (train mode: updated)
        torch.testing.assert_close(ours[key], ref[key], **TOL)
    running = [k for k in ours if "running_" in k]
    assert running and all(not torch.equal(ours[k], before[k]) for k in running)
    for i, branch in enumerate(BRANCHES):
        # declared: a θ whose layer is off the adversarial branch gets no gradient and no optimiser step
        key = f"featurizer.inserts.{['stem', 'res1', 'res2', 'res3', 'res4'][i]}.theta_mu"
        assert torch.equal(ours[key], before[key]) == (branch != "adv")


SGD_MAIN = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1}  # a main optimiser θ must not inherit


def _theta_gradients(method, batch, seed):
    """Pin fresh draws (every layer adversarial) on the method and on a copy of its network; the copy's θ and
    θ's gradient of the plain CE, as the reference trainer's backward computes it before its step."""
    _pin_draws(method, ["adv"] * 5, seed=seed)
    reference = copy.deepcopy(method.network)
    for layer, mine in zip(reference.featurizer.inserts.values(), method.style_layers):
        layer.pin(**mine._pinned)
    F.cross_entropy(reference(batch.images), batch.labels).backward()
    return {n: (p.detach().clone(), p.grad.clone()) for n, p in reference.named_parameters() if "theta" in n}


def _theta(method):
    return {n: p.detach().clone() for n, p in method.network.named_parameters() if "theta" in n}


def test_advstyle_adversary_step_is_plain_sgd_without_the_main_momentum_and_weight_decay():
    """The reference's `build_optimizer_advstle` under SGD: θ's optimiser has momentum 0 and weight decay 0 (and the
    main lr), so every adversary step is θ ← θ − lr·∇θ, the second one included (no momentum carried over)."""
    lr = 1e-2
    method, batch = _initialised(SGD_MAIN)
    for step in range(2):
        grads = _theta_gradients(method, batch, seed=30 + step)
        method.adversary_step(batch)
        ours = _theta(method)
        assert grads.keys() == ours.keys() and len(ours) == 10
        for name, (theta, grad) in grads.items():
            assert grad.abs().sum() > 0
            torch.testing.assert_close(ours[name], theta - lr * grad, **TOL)


def test_advstyle_option_adv_optimizer_main_steps_theta_with_the_main_momentum_and_weight_decay():
    """`adv_optimizer="main"` (not the reference): the first step is SGD with weight decay, θ ← θ − lr·(∇θ + wd·θ),
    and the second adds the momentum buffer, θ ← θ − lr·(0.9·b₁ + ∇θ + wd·θ) with b₁ the first step's direction."""
    lr, wd, mom = 1e-2, SGD_MAIN["weight_decay"], SGD_MAIN["momentum"]
    method, batch = _initialised({**SGD_MAIN, "adv_optimizer": "main"})
    buffers = {}
    for step in range(2):
        grads = _theta_gradients(method, batch, seed=30 + step)
        method.adversary_step(batch)
        ours = _theta(method)
        for name, (theta, grad) in grads.items():
            direction = grad + wd * theta + (mom * buffers[name] if name in buffers else 0.0)
            buffers[name] = direction
            torch.testing.assert_close(ours[name], theta - lr * direction, **TOL)
            assert not torch.allclose(ours[name], theta - lr * grad, **TOL)  # differs from the reference


def test_advstyle_option_freeze_bn_in_inner_leaves_the_buffers_the_reference_updates():
    method, batch = _initialised({"freeze_bn_in_inner": True})
    reference = copy.deepcopy(method.network)
    before = network_state(method.network)
    _pin_draws(method, BRANCHES)
    for layer, mine in zip(reference.featurizer.inserts.values(), method.style_layers):
        layer.pin(**mine._pinned)
    _reference_inner_step(reference, batch, lr=1e-2)
    method.adversary_step(batch)
    ours, ref = network_state(method.network), network_state(reference)
    running = [k for k in ours if "running_" in k or "num_batches" in k]
    assert all(torch.equal(ours[k], before[k]) for k in running)  # untouched with the option
    assert all(not torch.equal(ref[k], before[k]) for k in running)  # the reference moves them
    for key in (k for k in ours if "theta" in k):  # θ's step itself is the same (BN normalises alike)
        torch.testing.assert_close(ours[key], ref[key], **TOL)


def test_advstyle_option_inner_branch_adv_overrides_the_random_branch_choice():
    def branches_in_inner_steps(hp):
        method, batch = _initialised(hp)
        seen = []
        _record(method.style_layers, "branch", seen)
        torch.manual_seed(3)
        for _ in range(4):
            method.adversary_step(batch)
        return seen

    assert set(branches_in_inner_steps({})) == {"identity", "adv", "dsu"}  # the reference: random per layer
    assert set(branches_in_inner_steps({"inner_branch": "adv"})) == {"adv"}


def test_advstyle_theta_init_forward_sets_every_layer_and_leaves_the_buffers():
    """Declared difference: θ is initialised by one extra no-grad forward (every layer adversarial) on step 1."""
    torch.manual_seed(0)
    method = get_method("advstyle")(TASK, {}, "resnet-tiny")
    method.train()
    before = network_state(method.network)
    method._initialize_theta(Batch.concat(plates(0, 1)))
    after = network_state(method.network)
    assert all(bool(layer.initialized) for layer in method.style_layers)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k or "num_batches" in k)
    assert all(not torch.equal(before[k], after[k]) for k in before if "theta" in k)
