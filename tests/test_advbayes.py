"""ABA (methods/advbayes.py) against the equations of its official code (shengcheng/ABA, commit affb675).

The references below are written from `lib/networks/bayes_cnn.py` (`BConv2d.forward`, `calculate_kl`,
`randomize`), `lib/networks/multi_bnn.py` (`Multi_BNN.forward`) and `trainer_bnn.py` (the adversary loop,
the consistency loss, the classifier's loss, both Adam optimisers), in float64, on identical inputs and
identical noise (the weight noise ε re-drawn from the same global seed in the reference's order).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_methods_b import TASK, plate_batch
from platebench.methods import MethodError
from platebench.methods.advbayes import AdvBayes
from platebench.methods.base import queries_with_labels
from platebench.methods.blocks.bayes_aug import BayesAugmenter, BayesConv2d, MultiScaleBayesConv, consistency_loss

TOL = {"atol": 1e-10, "rtol": 1e-8}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


# ---- the reference's equations ----------------------------------------------------------------------
def ref_softplus(rho):
    return torch.log1p(torch.exp(rho))  # BConv2d: W_sigma = log1p(exp(W_rho))


def ref_kl(mu_q, sig_q, mu_p, sig_p):
    """calculate_kl as written (a mean over the elements)."""
    return 0.5 * (2 * torch.log(sig_p / sig_q) - 1 + (sig_q / sig_p).pow(2) + ((mu_p - mu_q) / sig_p).pow(2)).mean()


def ref_layer_kl(k, w_mu, w_rho, b_mu=None, b_rho=None):
    """BConv2d.kl_loss: calculate_kl(prior_mu, prior_sigma, W_mu, softplus(W_rho)) (+ the bias's)."""
    prior_sigma = 1 / math.sqrt(3 * k * k)
    kl = ref_kl(0.0, prior_sigma, w_mu, ref_softplus(w_rho))
    if b_mu is not None:
        kl = kl + ref_kl(0.0, prior_sigma, b_mu, ref_softplus(b_rho))
    return kl


def ref_bconv(x, k, w_mu, w_rho, b_mu=None, b_rho=None, clamp=False):
    """BConv2d.forward with sample=1: W_eps drawn first, then bias_eps; clamp: max(min(out, 1), 0.001)."""
    w_eps = torch.empty(w_mu.size(), dtype=w_mu.dtype).normal_(0, 1)
    weight = w_mu + w_eps * ref_softplus(w_rho)
    bias = None
    if b_mu is not None:
        b_eps = torch.empty(b_mu.size(), dtype=b_mu.dtype).normal_(0, 1)
        bias = b_mu + b_eps * ref_softplus(b_rho)
    out = F.conv2d(x, weight, bias, 1, k // 2)
    if clamp:
        out = torch.max(torch.min(out, torch.tensor(1.0, dtype=out.dtype)), torch.tensor(0.001, dtype=out.dtype))
    return out, ref_layer_kl(k, w_mu, w_rho, b_mu, b_rho)


def ref_multi_bnn(x, hidden, final):
    """Multi_BNN.forward: hidden BConv layers each followed by LeakyReLU(0.2), then the clamped final layer."""
    kl_total = 0
    for k, params in hidden:
        x, kl = ref_bconv(x, k, *params)
        x = torch.where(x >= 0, x, 0.2 * x)
        kl_total = kl_total + kl
    k, params = final
    out, kl = ref_bconv(x, k, *params, clamp=True)
    return out, kl_total + kl


def ref_consistency(outputs, outs_r, outs_g, wr, temp):
    """trainer_bnn.py's loss_cl, with nn.KLDivLoss(reduction='batchmean')."""
    p_clean, p_r = F.softmax(outputs, dim=1), F.softmax(outs_r, dim=1)
    p_g = F.softmax(outs_g / temp, dim=1)
    p_mix = (p_clean + wr * p_r + (2 - wr) * p_g) / 3
    log_mix = torch.clamp(p_mix, 1e-4, 1).log()
    kl_div = torch.nn.KLDivLoss(reduction="batchmean")
    return (kl_div(log_mix, p_clean) + wr * kl_div(log_mix, p_r) + (2 - wr) * kl_div(log_mix, p_g)) / 3


def ref_adam_first_step(theta, grad, lr):
    """torch.optim.Adam's first update (betas 0.9/0.999, eps 1e-8, no weight decay), from its equations."""
    m, v = (1 - ADAM_BETAS[0]) * grad, (1 - ADAM_BETAS[1]) * grad * grad
    m_hat, v_hat = m / (1 - ADAM_BETAS[0]), v / (1 - ADAM_BETAS[1])
    return theta - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


# ---- helpers ------------------------------------------------------------------------------------------------
def _params(conv: BayesConv2d):
    return tuple(p.detach().clone().requires_grad_() for p in (conv.weight_mu, conv.weight_rho, conv.bias_mu,
                                                               conv.bias_rho) if p is not None)


def _scramble(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (-1.0 if "rho" in name else 0.0))


def _method(**hp):
    torch.manual_seed(0)
    base = {"batch_size": 8, "depth": 1, "hidden_channels": 4, "kernel_sizes": "3"}
    return AdvBayes(TASK, {**base, **hp}, "resnet-tiny").double().train()


def _batch(seed=0):
    batch = plate_batch(1, n=6, seed=seed, n_controls=2)
    batch.labels[1] = -1  # a query without a class: left out of every loss
    batch.images = batch.images.double()
    return batch


def _ref_augmenter_params(method):
    hidden = [(layer.current, _params(layer.active)) for layer in method.augmenter.blocks]
    final = (method.augmenter.final.current, _params(method.augmenter.final.active))
    return hidden, final


# ---- the Bayesian layer, the KL, the augmenter ---------------------------------------------------------------
def test_bayes_conv_draws_weights_by_reparameterisation_like_the_reference():
    conv = BayesConv2d(3, 4, 5, bias=True).double()
    _scramble(conv, 1)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    proj = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.manual_seed(11)
    out = conv(x)
    (out * proj).sum().backward()
    params = _params(conv)
    torch.manual_seed(11)
    ref, _ = ref_bconv(x, 5, *params)
    (ref * proj).sum().backward()
    assert torch.allclose(out, ref, **TOL)
    for mine, theirs in zip((conv.weight_mu, conv.weight_rho, conv.bias_mu, conv.bias_rho), params):
        assert torch.allclose(mine.grad, theirs.grad, **TOL)
    torch.manual_seed(12)
    assert not torch.allclose(conv(x), out)  # fresh weights at every forward


def test_kl_is_the_references_prior_to_posterior_mean():
    conv = BayesConv2d(3, 4, 5, bias=True).double()
    _scramble(conv, 2)
    params = _params(conv)
    assert torch.allclose(conv.kl(), ref_layer_kl(5, *params), **TOL)
    # The same number from torch.distributions: KL(N(0, σ₀²) ‖ posterior), element mean, weight + bias.
    prior = 1 / math.sqrt(3 * 25)
    dist = torch.distributions
    by_torch = sum(dist.kl_divergence(dist.Normal(torch.zeros_like(mu), prior), dist.Normal(mu, F.softplus(rho))).mean()
                   for mu, rho in ((conv.weight_mu, conv.weight_rho), (conv.bias_mu, conv.bias_rho)))
    assert torch.allclose(conv.kl(), by_torch, **TOL)


def test_augmenter_forward_and_kl_match_the_reference_network():
    aug = BayesAugmenter(5, hidden=6, depth=2, kernel_sizes=(1, 3, 5)).double()
    aug.randomize(torch.Generator().manual_seed(3))
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64) * 2
    torch.manual_seed(4)
    out, kl = aug(x)
    hidden = [(layer.current, _params(layer.active)) for layer in aug.blocks]
    torch.manual_seed(4)
    ref, ref_kl_total = ref_multi_bnn(x, hidden, (aug.final.current, _params(aug.final.active)))
    assert torch.allclose(out, ref, **TOL) and torch.allclose(kl, ref_kl_total, **TOL)
    assert float(out.detach().min()) >= 0.001 and float(out.detach().max()) <= 1.0 and out.shape == x.shape


def test_randomize_picks_a_kernel_size_and_redraws_only_that_posterior():
    layer = MultiScaleBayesConv(18, 18, (1, 3, 5, 7), bias=True)
    picked = set()
    for seed in range(40):
        before = {k: c.weight_mu.detach().clone() for k, c in layer.convs.items()}
        layer.randomize(torch.Generator().manual_seed(seed))
        picked.add(layer.current)
        for k, conv in layer.convs.items():
            assert torch.equal(conv.weight_mu, before[k]) == (k != str(layer.current))
    assert picked == {1, 3, 5, 7}
    layer.current = 7
    layer.active.reset(torch.Generator().manual_seed(0))
    mu, rho = layer.active.weight_mu.detach(), layer.active.weight_rho.detach()  # 15,876 draws each
    assert abs(float(mu.mean())) < 0.005 and abs(float(mu.std()) - 0.1) < 0.005  # μ ~ N(0, 0.1²)
    assert abs(float(rho.mean()) + 1) < 0.005 and abs(float(rho.std()) - 0.1) < 0.005  # ρ ~ N(−1, 0.1²)


# ---- the objectives ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wr,temp", [(1.0, 1.0), (0.4, 2.0)])
def test_consistency_loss_matches_the_reference(wr, temp):
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    with torch.no_grad():  # one row confident in all three views: its mixture's other entries fall under 1e-4
        for view, scale in zip(logits, (1.0, 1.0, temp)):
            view[0] = torch.tensor([14.0 * scale, 0.0, 0.0, 0.0])
    mine = consistency_loss(*logits, wr=wr, temperature=temp)
    grads = torch.autograd.grad(mine, logits)
    ref = ref_consistency(*logits, wr, temp)
    assert torch.allclose(mine, ref, **TOL)
    for a, b in zip(grads, torch.autograd.grad(ref, logits)):
        assert torch.allclose(a, b, **TOL)


def test_consistency_loss_gradient_stays_finite_where_a_float32_softmax_underflows():
    # An augmented view with a logit gap of 200 (a run's adversary produced such views): float32's softmax gives
    # exact zeros there, and xlogy/KLDivLoss's gradient 0/0 = NaN; the loss and its gradient must equal the
    # reference's in float64, where nothing underflows.
    g = torch.Generator().manual_seed(7)
    logits = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    logits[2][1] = torch.tensor([200.0, 0.0, -10.0, 3.0], dtype=torch.float64)
    wide = [t.clone().requires_grad_() for t in logits]
    single = [t.float().requires_grad_() for t in logits]
    mine = consistency_loss(*single, wr=0.7, temperature=1.0)
    ref = ref_consistency(*wide, 0.7, 1.0)
    assert (F.softmax(single[2].detach(), 1)[1] == 0).any()  # the underflow really happens in float32
    assert torch.allclose(mine.double(), ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(mine, single), torch.autograd.grad(ref, wide)):
        assert torch.isfinite(a).all() and torch.allclose(a.double(), b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hp", [{}, {"elbo_beta": 0.3, "adv_layers": "all", "kernel_sizes": "1,3"}])
def test_adversary_step_is_one_adam_step_on_minus_ce_minus_beta_kl(hp):
    method = _method(adv_steps=1, **hp)
    batch = _batch()
    mask = queries_with_labels(batch)
    method.randomize_augmenter()
    hidden, final = _ref_augmenter_params(method)
    network = copy.deepcopy(method.network).eval()
    net_before = {k: v.clone() for k, v in method.network.state_dict().items()}
    method.network.eval()
    torch.manual_seed(7)
    method.adversary_steps(batch.images, batch.labels, mask)
    torch.manual_seed(7)
    x_g, kl = ref_multi_bnn(batch.images, hidden, final)
    loss = -F.cross_entropy(network(x_g)[mask], batch.labels[mask]) - method.hparams["elbo_beta"] * kl
    trained = [final[1]] + ([p for _, p in hidden] if method.hparams["adv_layers"] == "all" else [])
    flat = [p for group in trained for p in group]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat)))
    lr = method.hparams["adv_lr"]
    for layer, (_, params) in zip(method.augmenter.layers(), [*hidden, final]):
        for mine, ref in zip(_params(layer.active), params):
            want = ref_adam_first_step(ref, grads[id(ref)], lr) if id(ref) in grads else ref
            assert torch.allclose(mine, want, **TOL)
            assert torch.equal(mine, ref) == (id(ref) not in grads)  # only the optimised posteriors move
    assert all(torch.equal(v, net_before[k]) for k, v in method.network.state_dict().items())


def test_training_step_steps_the_classifier_on_ce_and_consistency():
    method = _method(adv_steps=0, kernel_sizes="1,3", consistency_weight=0.6, resample_weight=0.5,
                     adv_temperature=2.0)
    batch = _batch(1)
    mask = queries_with_labels(batch)
    network = copy.deepcopy(method.network).train()
    torch.manual_seed(8)
    metrics = method.training_step(batch)
    hidden, final = _ref_augmenter_params(method)  # adv_steps=0: the fresh draw, untouched
    outputs = network(batch.images)  # train mode, as the reference's clean forward
    ce = F.cross_entropy(outputs[mask], batch.labels[mask])
    torch.manual_seed(8)
    with torch.no_grad():
        x_g, _ = ref_multi_bnn(batch.images, hidden, final)
        x_r, _ = ref_multi_bnn(batch.images, hidden, final)
    network.eval()  # the reference's net.eval() before the augmented forwards
    loss_cl = ref_consistency(outputs[mask], network(x_r)[mask], network(x_g)[mask], 0.5, 2.0)
    loss = (1 - 0.6) * ce + 0.6 * loss_cl
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-9)
    params = list(network.parameters())
    grads = torch.autograd.grad(loss, params)
    for mine, ref, grad in zip(method.network.parameters(), params, grads):
        assert torch.allclose(mine, ref_adam_first_step(ref, grad, 1e-4), **TOL)  # the recipe: Adam, lr 1e-4


def test_warm_up_fraction_trains_on_clean_cross_entropy_only():
    method = _method()
    method.on_epoch_start(0, 16, steps_per_epoch=4)  # pretrain_fraction 0.125 of 16 epochs: the first two
    batch = _batch()
    augmenter = {k: v.clone() for k, v in method.augmenter.state_dict().items()}
    metrics = method.training_step(batch)
    assert "consistency" not in metrics and metrics["loss"] == metrics["ce"]
    assert all(torch.equal(v, augmenter[k]) for k, v in method.augmenter.state_dict().items())
    assert int(method.aug_draws) == 0
    method.on_epoch_start(1, 16, steps_per_epoch=4)
    assert not method.augmenting()
    method.on_epoch_start(2, 16, steps_per_epoch=4)
    assert method.augmenting()
    method.on_epoch_start(1, 10, steps_per_epoch=4)  # 1.25 epochs: from the second step of epoch 1
    assert not method.augmenting()
    assert "consistency" not in method.training_step(batch)
    assert method.augmenting()


def test_augmenter_draws_depend_on_the_run_seed_and_the_step_only():
    a, b = _method(), _method()
    for method in (a, b):
        method.randomize_augmenter()
    assert all(torch.equal(x, y) for x, y in zip(a.augmenter.parameters(), b.augmenter.parameters()))
    before = [p.clone() for p in a.augmenter.final.active.parameters()]
    a.randomize_augmenter()  # the next step draws another posterior
    assert int(a.aug_draws) == 2
    assert not all(torch.equal(x, y) for x, y in zip(before, a.augmenter.final.active.parameters()))


def test_lr_schedule_scales_the_classifier_but_not_the_augmenter():
    method = _method()
    method.set_lr_factor(0.5)
    assert method.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5e-4)
    assert method.optimizers[1].param_groups[0]["lr"] == pytest.approx(5e-6)


@pytest.mark.parametrize("hp,message", [
    ({"kernel_sizes": "2,3"}, "'kernel_sizes' must be distinct odd sizes"),
    ({"kernel_sizes": "a"}, "'kernel_sizes' must be distinct odd sizes"),
    ({"adv_layers": "hidden"}, "'adv_layers' must be one of final, all"),
    ({"consistency_weight": 1.5}, r"'consistency_weight' must be in \[0, 1\]"),
    ({"lr": -1.0}, "'lr' must be in"),
    ({"pretrain_fraction": 1.0}, "'pretrain_fraction' must be in"),
])
def test_bad_hyperparameters_are_errors(hp, message):
    with pytest.raises(MethodError, match=message):
        AdvBayes(TASK, hp, "resnet-tiny")
