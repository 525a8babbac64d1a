"""BN-statistics building blocks (methods/blocks/bn.py) and the AdaBN / BEN / ARM-BN / CS-ARM-BN methods.

Properties of AdaBN, BEN, ARM-BN and CS-ARM-BN, on tiny tensors (5 channels, 16x16, resnet-tiny).
"""

from __future__ import annotations

import copy

import pytest
import torch
from platebench.methods import MethodError
from platebench.methods.adabn import AdaBN
from platebench.methods.arm_bn import ARMBN
from platebench.methods.base import Batch
from platebench.methods.ben import BEN
from platebench.methods.blocks.bn import (
    batch_stats,
    forward_per_group,
    randomize_running_stats,
    rows_stats,
    running_stats_from,
)
from platebench.methods.cs_arm_bn import CSARMBN
from platebench.methods.network import Network
from platebench.methods.testing import TASK, build, eval_batch, synthetic_batch
from torch import nn


def _net(seed: int = 0) -> Network:
    torch.manual_seed(seed)
    net = Network("resnet-tiny", 5, 3)
    randomize_running_stats(net, torch.Generator().manual_seed(seed))  # buffers far from any batch's stats
    return net.eval()


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 5, 16, 16, generator=torch.Generator().manual_seed(seed)) + shift


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


# ---- blocks/bn.py --------------------------------------------------------------------------------
def test_batch_stats_equals_train_mode_and_leaves_buffers_and_modes_alone():
    net, x = _net(), _images(6, 1)
    reference = copy.deepcopy(net).train()
    before, eval_out = _buffers(net), net(x)
    with batch_stats(net):
        out = net(x)
    assert torch.allclose(out, reference(x), atol=1e-5)
    assert not torch.allclose(out, eval_out, atol=1e-3)  # the context really changed the statistics used
    for key, value in _buffers(net).items():
        assert torch.equal(value, before[key]), key
    assert not net.training and not net.featurizer.bn1.training and net.featurizer.bn1.track_running_stats
    assert torch.allclose(net(x), eval_out)


def test_rows_stats_all_rows_equals_batch_stats_and_subset_uses_subset_statistics():
    net, x = _net(), _images(8, 2)
    with batch_stats(net):
        want = net(x)
    with rows_stats(net, torch.ones(8, dtype=torch.bool)):
        got = net(x)
    assert torch.allclose(got, want, atol=1e-5)

    rows = torch.tensor([False, True, False, True, True, False, False, True])
    seen = {}
    # clone: the ReLU after bn1 is in-place
    handle = net.featurizer.bn1.register_forward_hook(lambda m, i, o: seen.update(x=i[0].clone(), y=o.clone()))
    before = _buffers(net)
    with rows_stats(net, rows):
        net(x)
    handle.remove()
    h, bn = seen["x"], net.featurizer.bn1
    mean, var = h[rows].mean((0, 2, 3), keepdim=True), h[rows].var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(seen["y"], expected, atol=1e-5)
    assert not torch.allclose(h.mean((0, 2, 3), keepdim=True), mean, atol=1e-3)  # subset ≠ all rows
    assert all(torch.equal(v, before[k]) for k, v in _buffers(net).items())
    assert "forward" not in net.featurizer.bn1.__dict__  # the patch is gone


def test_forward_per_group_equals_separate_forwards_and_differs_from_mixed():
    net = _net()
    a, b = _images(5, 3, shift=1.0), _images(4, 4, shift=-1.0)
    x = torch.cat([a, b])[torch.tensor([0, 5, 1, 6, 2, 7, 3, 8, 4])]  # interleaved plates
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    out = forward_per_group(net, x, groups)
    with batch_stats(net):
        sep_a, sep_b, mixed = net(a), net(b), net(x)
    assert torch.allclose(out[groups == 0], sep_a, atol=1e-5)
    assert torch.allclose(out[groups == 1], sep_b, atol=1e-5)
    assert not torch.allclose(out, mixed, atol=1e-3)


def test_running_stats_from_fills_buffers_from_the_given_rows_and_restores_everything():
    net, x, q = _net(), _images(7, 5), _images(3, 6)
    bn = net.featurizer.bn1
    bn.momentum = 0.3
    before, modes = _buffers(net), [m.training for m in net.modules()]
    seen = {}
    handle = bn.register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0].detach()))
    with running_stats_from(net, x, momentum=None):  # momentum None: exact statistics of x
        handle.remove()
        assert not net.training and not bn.training and bn.momentum is None
        first = seen["x"]
        assert torch.allclose(bn.running_mean, first.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, first.var((0, 2, 3), unbiased=True), atol=1e-4)
        together = net(torch.cat([q, x]))[:3]
        assert torch.allclose(net(q), together, atol=1e-5)  # eval mode: rows do not interact
    assert bn.momentum == 0.3 and [m.training for m in net.modules()] == modes
    for key, value in _buffers(net).items():
        assert torch.equal(value, before[key]), key


def test_randomize_running_stats_trainable_only_skips_frozen_layers():
    net = _net()
    net.featurizer.bn1.requires_grad_(False)
    frozen = net.featurizer.bn1.running_mean.clone()
    changed = randomize_running_stats(net, torch.Generator().manual_seed(9), trainable_only=True)
    assert torch.equal(net.featurizer.bn1.running_mean, frozen)
    assert changed == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) - 1


# ---- shared tta properties -----------------------------------------------------------------------
TTA_BN = [AdaBN, BEN, ARMBN, CSARMBN]


@pytest.mark.parametrize("cls", TTA_BN, ids=lambda c: c.name)
def test_predict_ignores_running_stats_and_depends_on_batch_composition(cls):
    method = build(cls, {"plates_per_step": 2} if cls is not AdaBN else None).eval()
    g = torch.Generator().manual_seed(11)
    a = eval_batch(method, 1, 6, g, classes=torch.zeros(6, dtype=torch.long))
    b = eval_batch(method, 1, 6, g, classes=torch.full((6,), 2, dtype=torch.long))
    b.images[0] = a.images[0]
    with torch.no_grad():
        pred_a, pred_b = method.predict(a), method.predict(b)
        randomize_running_stats(method, torch.Generator().manual_seed(12))
        pred_a_random = method.predict(a)
    assert torch.allclose(pred_a, pred_a_random, atol=1e-5)
    assert (pred_a[0] - pred_b[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cls", TTA_BN, ids=lambda c: c.name)
def test_predict_refuses_mixed_plate_batches(cls):
    method = build(cls, {"plates_per_step": 2} if cls is not AdaBN else None).eval()
    g = torch.Generator().manual_seed(13)
    mixed = Batch.concat([eval_batch(method, 0, 3, g), eval_batch(method, 4, 3, g)])
    with pytest.raises(MethodError, match=r"plate-pure.*\[0, 4\]"):
        method.predict(mixed)


# ---- AdaBN ---------------------------------------------------------------------------------------
def test_adabn_rejects_unknown_adapt_mode_naming_it():
    with pytest.raises(MethodError, match=r"'adapt' must be one of plate, batch, got 'domain'"):
        build(AdaBN, {"adapt": "domain"})


# ---- BEN -----------------------------------------------------------------------------------------
def test_ben_step_is_the_mean_of_per_plate_gradients():
    hp = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr": 0.1, "plates_per_step": 2}
    g = torch.Generator().manual_seed(15)
    plates = [synthetic_batch(TASK, 0, 6, 0, g), synthetic_batch(TASK, 3, 6, 0, g)]
    method = build(BEN, hp).train()
    start = copy.deepcopy(method.network)
    method.training_step(plates)
    grads = []
    for plate in plates:
        ref = copy.deepcopy(start).train()
        loss = nn.functional.cross_entropy(ref(plate.images), plate.labels)
        grads.append(torch.autograd.grad(loss, list(ref.parameters())))
    for p0, p1, g0, g1 in zip(start.parameters(), method.network.parameters(), *grads):
        assert torch.allclose(p1, p0 - 0.1 * (g0 + g1) / 2, atol=1e-6)


def test_ben_data_request_is_plate_pure_with_plates_per_step():
    req = build(BEN, {"plates_per_step": 3}).data_request()
    assert (req.plate_pure, req.plates_per_step, req.batch_size, req.n_controls) == (True, 3, 8, 0)


# ---- ARM-BN --------------------------------------------------------------------------------------
def test_arm_bn_meta_batch_equals_separate_chunk_forwards():
    method = build(ARMBN, {"plates_per_step": 2}).train()
    g = torch.Generator().manual_seed(16)
    a, b = synthetic_batch(TASK, 0, 5, 0, g), synthetic_batch(TASK, 5, 7, 0, g)
    logits, meta = method.forward_meta_batch([a, b])
    with batch_stats(method.network):
        sep = torch.cat([method.network(a.images), method.network(b.images)])
        mixed = method.network(torch.cat([a.images, b.images]))
    assert torch.allclose(logits, sep, atol=1e-5)
    assert not torch.allclose(logits, mixed, atol=1e-3)
    assert torch.equal(meta.labels, torch.cat([a.labels, b.labels]))


def test_arm_bn_loss_is_the_mean_ce_over_the_meta_batch():
    method = build(ARMBN, {"plates_per_step": 2, "lr": 1e-12}).train()
    g = torch.Generator().manual_seed(17)
    a, b = synthetic_batch(TASK, 0, 4, 0, g), synthetic_batch(TASK, 5, 8, 0, g)
    with torch.no_grad():
        logits, meta = method.forward_meta_batch([a, b])
    want = nn.functional.cross_entropy(logits, meta.labels)
    assert abs(method.training_step([a, b])["loss"] - float(want)) < 1e-5


# ---- CS-ARM-BN -----------------------------------------------------------------------------------
def test_cs_arm_bn_data_request_asks_for_l_queries_and_m_minus_l_controls():
    req = build(CSARMBN, {"batch_size": 16, "n_controls": 48, "eval_n_controls": 40, "plates_per_step": 3}
                ).data_request()
    assert (req.batch_size, req.n_controls, req.eval_n_controls, req.plates_per_step, req.plate_pure) == \
        (16, 48, 40, 3, True)


def test_cs_arm_bn_refuses_a_context_without_controls():
    method = build(CSARMBN).eval()
    batch = synthetic_batch(TASK, 1, 6, 0, torch.Generator().manual_seed(18))
    with pytest.raises(MethodError, match=r"negative-control rows.*eval_n_controls.*'P1' has 0"):
        method.predict(batch)


def test_cs_arm_bn_loss_ignores_control_labels_but_controls_shape_the_statistics():
    g = torch.Generator().manual_seed(19)
    batch = synthetic_batch(TASK, 2, 6, 10, g)
    relabelled = copy.copy(batch)
    relabelled.labels = batch.labels.clone()
    relabelled.labels[batch.is_control] = torch.randint(3, (10,), generator=g)
    other_controls = copy.copy(batch)
    other_controls.images = batch.images.clone()
    other_controls.images[batch.is_control] += 3.0
    results = []
    for b in (batch, relabelled, other_controls):
        method = build(CSARMBN, {"plates_per_step": 1, "n_controls": 10})
        loss = method.training_step(b)["loss"]
        results.append((loss, torch.cat([p.detach().flatten() for p in method.parameters()])))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert abs(results[0][0] - results[2][0]) > 1e-4


def test_cs_arm_bn_first_bn_uses_the_pooled_query_and_control_mean():
    method = build(CSARMBN, {"batch_size": 8, "eval_n_controls": 24}).eval()
    g = torch.Generator().manual_seed(20)
    batch = eval_batch(method, 3, 8, g, classes=torch.zeros(8, dtype=torch.long))
    seen = {}
    bn = method.network.featurizer.bn1
    handle = bn.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().double(), y=o.detach().double()))
    with torch.no_grad():
        method.predict(batch)
    handle.remove()
    x, q, c = seen["x"], batch.queries, batch.is_control
    ratio = q.sum() / len(batch)  # L / M
    mu_q, mu_c = x[q].mean((0, 2, 3)), x[c].mean((0, 2, 3))
    pooled = ratio * mu_q + (1 - ratio) * mu_c
    assert torch.allclose(x.mean((0, 2, 3)), pooled, atol=1e-6)
    var = ((x - pooled.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    scale = (bn.weight.double() / torch.sqrt(var + bn.eps)).view(1, -1, 1, 1)
    assert torch.allclose(seen["y"], (x - pooled.view(1, -1, 1, 1)) * scale + bn.bias.double().view(1, -1, 1, 1),
                          atol=1e-5)
    assert (pooled - mu_q).abs().max() > 1e-3  # the controls really moved the statistics


def test_cs_arm_bn_controls_damp_label_shift_in_the_context():
    """Label-shift robustness: a query's logits move less between two label-shifted contexts when controls are
    present."""
    with_controls = build(CSARMBN, {"batch_size": 16, "eval_n_controls": 64}).eval()
    without = build(CSARMBN, {"batch_size": 16, "eval_n_controls": 0, "n_controls": 0}).eval()
    without.load_state_dict(with_controls.state_dict())
    g = torch.Generator().manual_seed(21)
    controls = synthetic_batch(TASK, 4, 0, 64, g)
    queries = {k: synthetic_batch(TASK, 4, 16, 0, g, classes=torch.full((16,), k)) for k in (0, 1)}
    queries[1].images[0] = queries[0].images[0]
    deltas = {}
    with torch.no_grad():
        for name, method, extra in (("with", with_controls, [controls]), ("without", without, [])):
            p0, p1 = (method.predict(Batch.concat([queries[k], *extra]))[0] for k in (0, 1))
            deltas[name] = float((p0 - p1).abs().mean())
    assert deltas["with"] < deltas["without"], deltas


@pytest.mark.parametrize("stats_from", ["controls", "controls-batch-stats"])
def test_cs_arm_bn_controls_only_statistics_make_queries_independent(stats_from):
    method = build(CSARMBN, {"stats_from": stats_from}).eval()
    g = torch.Generator().manual_seed(22)
    a = eval_batch(method, 0, 6, g)
    b = copy.copy(a)
    b.images = a.images.clone()
    b.images[1:6] = torch.randn(5, 5, 16, 16, generator=g) * 3  # other queries change, controls do not
    with torch.no_grad():
        assert torch.allclose(method.predict(a)[0], method.predict(b)[0], atol=1e-5)


def test_cs_arm_bn_rejects_bad_stats_from():
    with pytest.raises(MethodError, match=r"stats_from.*'queries'"):
        build(CSARMBN, {"stats_from": "queries"})
