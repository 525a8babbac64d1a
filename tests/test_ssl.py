"""SimCLR, BYOL and DINO against independent re-derivations of their official code's equations.

Each reference below is written here from the official code's equations (never by calling the project's losses or
schedules) and fed the same inputs as the project's code: google-research/simclr tf2/objective.py
`add_contrastive_loss` (with and without the cross-replica concat); google-deepmind/deepmind-research byol/
utils/helpers.py `regression_loss`, utils/schedules.py `target_ema` and byol_experiment.py `_update_fn`;
facebookresearch/dino main_dino.py `DINOLoss` and `train_one_epoch`, utils.py `cosine_scheduler`,
`clip_gradients` and `cancel_gradients_last_layer`, vision_transformer.py `DINOHead`. Then the protocol shared by
the three: labels never reach the SSL networks, and `probe=two-stage` trains the SSL networks, then only the probe.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from platebench.methods import MethodError
from platebench.methods.blocks import ssl
from platebench.methods.byol import BYOL
from platebench.methods.dino import DINO
from platebench.methods.simclr import SimCLR
from platebench.methods.testing import TASK, build, mixed_batch

pytestmark = pytest.mark.unit

TOL = {"atol": 1e-6, "rtol": 1e-5}
SMALL = {  # narrow heads: the equations do not depend on the widths, and CPU steps stay milliseconds
    SimCLR: {"proj_dim": 8},
    BYOL: {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16},
    DINO: {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "local_crops": 2},
}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max |difference| {float((a - b).abs().max()):.3g}"


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TASK.channels, *TASK.image_size, generator=torch.Generator().manual_seed(seed))


def _twin(g: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(g.get_state())


# ---- SimCLR: tf2/objective.py add_contrastive_loss ---------------------------------------------------------
LARGE_NUM = 1e9


def tf_l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """tf.math.l2_normalize: x · rsqrt(max(Σx², 1e-12))."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))


def simclr_reference(hidden: torch.Tensor, temperature: float, replica: int = 0,
                     other_replicas: list[torch.Tensor] = ()) -> torch.Tensor:
    """`hidden` = [view-1 rows; view-2 rows] of this replica; `other_replicas` the other replicas' hidden (in replica
    order, this one left out): hidden*_large is every replica's normalised rows, this one's at `replica`."""
    hidden1, hidden2 = tf_l2_normalize(hidden).chunk(2)
    n = hidden1.shape[0]
    parts = [tf_l2_normalize(h).chunk(2) for h in other_replicas]
    parts.insert(replica, (hidden1, hidden2))
    hidden1_large, hidden2_large = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    enlarged = hidden1_large.shape[0]
    labels_idx = torch.arange(n) + replica * n
    labels = F.one_hot(labels_idx, enlarged * 2).to(hidden.dtype)
    masks = F.one_hot(labels_idx, enlarged).to(hidden.dtype)
    logits_aa = hidden1 @ hidden1_large.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature
    loss_a = -(labels * torch.log_softmax(torch.cat([logits_ab, logits_aa], 1), -1)).sum(-1)
    loss_b = -(labels * torch.log_softmax(torch.cat([logits_ba, logits_bb], 1), -1)).sum(-1)
    return (loss_a + loss_b).mean()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_simclr_add_contrastive_loss_and_its_gradient(temperature):
    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref = simclr_reference(torch.cat([z1, z2]), temperature)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    got = ssl.nt_xent(z1, z2, temperature)
    got_grads = torch.autograd.grad(got, (z1, z2))
    _close(got, ref, "NT-Xent")
    for a, b, name in zip(got_grads, ref_grads, ("z1", "z2")):
        _close(a, b, f"NT-Xent gradient w.r.t. {name}")


def test_nt_xent_global_negatives_equal_the_cross_replica_concat_and_local_ones_ignore_it(monkeypatch):
    """Replica 1 of 2: the other replica's (normalised) rows come first in hidden*_large and the positives sit at
    offset n; `negatives=local` is the reference without a strategy."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = (torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    other = torch.randn(8, 5, generator=g, dtype=torch.float64)
    gathered = iter(F.normalize(other, dim=1).chunk(2))  # what rank 0 sends: its normalised view 1, then view 2
    monkeypatch.setattr(ssl, "gather_with_grad", lambda x: (torch.cat([next(gathered), x]), 4))
    ref = simclr_reference(torch.cat([z1, z2]), 0.2, replica=1, other_replicas=[other])
    got = ssl.nt_xent(z1, z2, 0.2, global_negatives=True)
    _close(got, ref, "NT-Xent with the cross-replica concat")
    for a, b in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        _close(a, b, "NT-Xent gradient with the cross-replica concat")
    local = ssl.nt_xent(z1, z2, 0.2, global_negatives=False)
    _close(local, simclr_reference(torch.cat([z1, z2]), 0.2), "NT-Xent with negatives=local")
    assert abs(float((local - got).detach())) > 1e-3  # the other replica's negatives do change the loss


def test_simclr_step_loss_is_the_reference_on_one_forward_of_both_views():
    """The official model concatenates the two views into one batch (one BatchNorm pass over 2N rows)."""
    method = build(SimCLR, SMALL[SimCLR])
    method.train()
    images, g = _images(), torch.Generator().manual_seed(3)
    twin = copy.deepcopy(method)
    loss, features, _ = method.ssl_loss(images, g)
    g2 = _twin(g.manual_seed(3))
    views = torch.cat([twin.view(images, g2), twin.view(images, g2)])
    hiddens = twin.encoder(views)
    ref = simclr_reference(twin.projector(hiddens), twin.hparams["temperature"])
    _close(loss, ref, "SimCLR step loss")
    _close(features, hiddens.detach(), "SimCLR probe features (the encoder output, ft_proj_selector 0)")


# ---- BYOL: helpers.regression_loss, schedules.target_ema, _update_fn --------------------------------------
def byol_regression_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((tf_l2_normalize(x) - tf_l2_normalize(y)) ** 2).sum(-1)


def target_ema_reference(step: int, base_ema: float, max_steps: int) -> float:
    decay = 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    return 1.0 - (1.0 - base_ema) * decay


def test_byol_regression_loss_equals_the_reference_including_its_epsilon():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    x[3], y[4] = 0.0, 1e-9  # a zero row and a row below the epsilon
    _close(ssl.byol_regression(x, y), byol_regression_reference(x, y), "BYOL regression loss")
    cos = F.cosine_similarity(x[:3], y[:3], dim=-1)
    _close(ssl.byol_regression(x[:3], y[:3]), 2 - 2 * cos, "BYOL regression loss = 2 − 2·cos")


@pytest.mark.parametrize("base,total", [(0.99, 12), (0.996, 7)])
def test_cosine_schedule_to_one_is_byol_target_ema_at_every_step(base, total):
    for step in range(total + 2):
        assert ssl.cosine_schedule(base, 1.0, step, total) == pytest.approx(target_ema_reference(step, base, total))


def test_byol_step_loss_is_the_symmetrised_reference_with_a_stopped_target():
    method = build(BYOL, SMALL[BYOL])
    method.train()
    images, g = _images(), torch.Generator().manual_seed(5)
    twin = copy.deepcopy(method)
    loss, features, _ = method.ssl_loss(images, g)
    g2 = _twin(g.manual_seed(5))
    v1, v2 = (view(images, g2) for view in twin.views)
    online = [twin.predictor(twin.projector(twin.encoder(v))) for v in (v1, v2)]  # each view through on its own
    target = [twin.target_projector(twin.target_encoder(v)).detach() for v in (v1, v2)]
    ref = (byol_regression_reference(online[0], target[1]) + byol_regression_reference(online[1], target[0])).mean()
    _close(loss, ref, "BYOL step loss")
    _close(features, twin.encoder(v1).detach(), "BYOL probe features (the online encoder on view 1)")
    loss.backward()
    assert all(p.grad is None for p in method.target_parameters()), "a gradient reached the target network"


def test_byol_target_moves_by_the_ema_of_update_fn_with_the_cosine_tau():
    """After the online update at global step k: ξ ← ξ + (1 − τ_k)(θ − ξ), τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2."""
    method = build(BYOL, SMALL[BYOL])
    batch = mixed_batch(TASK, 8, generator=torch.Generator().manual_seed(6))
    epochs, steps = 3, 4
    method.on_epoch_start(1, epochs, steps)
    method.train()
    for k in (4, 5):  # the first two updates of epoch 1
        before = [p.detach().clone() for p in method.target_parameters()]
        metrics = method.training_step(batch)
        tau = target_ema_reference(k, method.hparams["target_momentum"], epochs * steps)
        assert metrics["tau"] == pytest.approx(tau)
        for xi, theta, xi_new in zip(before, method.online_parameters(), method.target_parameters()):
            _close(xi_new, xi + (1 - tau) * (theta.detach() - xi), f"target after update {k}")


def test_byol_option_target_init_copy_starts_the_target_at_the_online_network():
    independent = build(BYOL, SMALL[BYOL])  # the code's default: online and target from different rngs
    copied = build(BYOL, {**SMALL[BYOL], "target_init": "copy"})
    pairs = lambda m: zip(m.online_parameters(), m.target_parameters())  # noqa: E731
    assert all(torch.equal(a, b) for a, b in pairs(copied))
    assert not all(torch.equal(a, b) for a, b in pairs(independent))


# ---- DINO: DINOLoss, cosine_scheduler, train_one_epoch ----------------------------------------------------
def dino_cosine_scheduler(base: float, final: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    iters = np.arange(epochs * niter_per_ep)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


class DINOLossReference:
    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        self.center = torch.zeros(1, out_dim)
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum

    def __call__(self, student_output: torch.Tensor, teacher_output: torch.Tensor, temp: float) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        batch_center = teacher_output.detach().sum(0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


def test_dino_loss_and_centre_equal_main_dino_over_two_steps():
    g = torch.Generator().manual_seed(7)
    ncrops, n, k = 5, 3, 11
    ref = DINOLossReference(k, ncrops, student_temp=0.1, center_momentum=0.8)
    mine = ssl.DINOLoss(k, student_temp=0.1, center_momentum=0.8)
    for temp in (0.07, 0.04):
        student = torch.randn(ncrops * n, k, generator=g, requires_grad=True)
        teacher = torch.randn(2 * n, k, generator=g)
        want, got = ref(student, teacher, temp), mine(student, teacher, ncrops, temp)
        _close(got, want, "DINO loss")
        _close(torch.autograd.grad(got, student)[0], torch.autograd.grad(want, student)[0], "DINO loss gradient")
        _close(mine.center, ref.center, "DINO centre after its EMA update")


@pytest.mark.parametrize("warmup_epochs", [0, 1, 4])
def test_teacher_temperature_is_linspace_warm_up_then_constant(warmup_epochs):
    epochs = 6
    want = teacher_temp_schedule(0.02, 0.07, warmup_epochs, epochs)
    got = [ssl.teacher_temperature(e, 0.02, 0.07, warmup_epochs) for e in range(epochs)]
    assert got == pytest.approx(want.tolist())


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.04, 0.4)])
def test_cosine_schedule_is_dino_cosine_scheduler_at_every_iteration(base, final):
    epochs, niter = 3, 5
    want = dino_cosine_scheduler(base, final, epochs, niter)
    got = [ssl.cosine_schedule(base, final, it, epochs * niter) for it in range(epochs * niter)]
    assert got == pytest.approx(want.tolist())


def test_clip_per_parameter_is_dino_clip_gradients():
    g = torch.Generator().manual_seed(8)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(3, 2, requires_grad=True), torch.zeros(2)]
    for p, scale in zip(params[:2], (10.0, 0.1)):  # one gradient above the clip, one below
        p.grad = torch.randn(p.shape, generator=g) * scale
    want = []
    for p in params[:2]:
        norm = p.grad.norm(2)
        coef = 3.0 / (norm + 1e-6)
        want.append(p.grad * coef if coef < 1 else p.grad.clone())
    ssl.clip_per_parameter_(params, 3.0)
    for p, w in zip(params, want):
        _close(p.grad, w, "clipped gradient")
    assert params[2].grad is None


def test_dino_head_outputs_cosines_with_the_weight_normalised_prototypes():
    """DINOHead: MLP → L2 normalisation → weight_norm(Linear, no bias) with g = 1 and frozen (norm_last_layer)."""
    head = ssl.DINOHead(6, 10, layers=3, hidden_dim=12, bottleneck_dim=4)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(6, 12), (12, 12), (12, 4)]
    h = x
    for m in layers[:-1]:
        h = F.gelu(m(h))
    v = head.last_layer.parametrizations.weight.original1
    want = F.normalize(layers[-1](h), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T
    _close(head(x), want, "DINO head output")
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_step_loss_is_the_reference_on_the_multi_crop_forward():
    """The teacher sees the two global crops, the student every crop; the backbone runs once per resolution."""
    method = build(DINO, SMALL[DINO])
    method.train()
    method.on_epoch_start(0, 2, 3)
    images, g = _images(), torch.Generator().manual_seed(10)
    twin = copy.deepcopy(method)
    ref = DINOLossReference(SMALL[DINO]["out_dim"], 2 + SMALL[DINO]["local_crops"])
    ref.center = method.dino_loss.center.clone()
    loss, features, metrics = method.ssl_loss(images, g)
    g2 = _twin(g.manual_seed(10))
    crops = [view(images, g2) for view in twin.global_views] + [twin.local_view(images, g2) for _ in range(2)]
    with torch.no_grad():
        teacher_features = twin.teacher.backbone(torch.cat(crops[:2]))
        teacher_out = twin.teacher.head(teacher_features)
    student_features = torch.cat([twin.student.backbone(torch.cat(crops[:2])),
                                  twin.student.backbone(torch.cat(crops[2:]))])
    want = ref(twin.student.head(student_features), teacher_out, method.hparams["teacher_temp"])
    assert metrics["dino_ce"] == pytest.approx(float(want.detach()), rel=1e-5)
    _close(method.dino_loss.center, ref.center, "centre after the step")
    _close(features, teacher_features, "DINO probe features (the teacher backbone on the global crops)")


def test_dino_student_update_follows_train_one_epoch():
    """At iteration it: weight decay wd_schedule[it] on the decayed group, last layer frozen in epoch 0 only,
    teacher ← m·teacher + (1 − m)·student with m = momentum_schedule[it], per-parameter clipping."""
    hp = {**SMALL[DINO], "clip_per_param": 1e-3}
    method = build(DINO, hp)
    batch = mixed_batch(TASK, 8, generator=torch.Generator().manual_seed(11))
    epochs, steps = 2, 3
    wd = dino_cosine_scheduler(method.hparams["weight_decay"], method.hparams["weight_decay_end"], epochs, steps)
    momentum = dino_cosine_scheduler(method.hparams["momentum_teacher"], 1.0, epochs, steps)
    last = method.student.head.last_layer.parametrizations.weight.original1
    method.train()
    for epoch in range(epochs):
        method.on_epoch_start(epoch, epochs, steps)
        it = epoch * steps
        teacher = [p.detach().clone() for p in method.teacher.parameters()]
        last_before = last.detach().clone()
        method.training_step(batch)
        assert method.optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(wd[it])
        assert method.optimizers[0].param_groups[1]["weight_decay"] == 0.0
        assert torch.equal(last, last_before) == (epoch == 0), f"last layer frozen in epoch {epoch}?"
        for t0, s, t in zip(teacher, method.student.parameters(), method.teacher.parameters()):
            _close(t, momentum[it] * t0 + (1 - momentum[it]) * s.detach(), f"teacher after iteration {it}")
        norms = [float(p.grad.norm()) for p in method.student.parameters() if p.grad is not None]
        assert norms and max(norms) <= 1e-3 * (1 + 1e-4), f"a gradient above the per-parameter clip: {max(norms)}"


# ---- the protocol: no label reaches the SSL networks; the two-stage option --------------------------------
def _trained(cls, hparams, labels_shift: int, steps: int = 2):
    method = build(cls, hparams)
    batch = mixed_batch(TASK, 8, generator=torch.Generator().manual_seed(12))
    batch.labels = (batch.labels + labels_shift) % TASK.num_classes  # other labels, same images
    method.on_epoch_start(0, 2, 4)
    method.train()
    torch.manual_seed(13)  # the same views in both trainings
    for _ in range(steps):
        method.training_step(batch)
    return method


@pytest.mark.parametrize("cls", [SimCLR, BYOL, DINO], ids=lambda c: c.name)
def test_labels_never_reach_the_ssl_networks(cls):
    """Two trainings on the same images with different labels: every SSL parameter, gradient and buffer is
    identical (the probe reads detached features and has its own optimiser); the probes differ."""
    a, b = _trained(cls, SMALL[cls], 0), _trained(cls, SMALL[cls], 1)
    ssl_params = [(n, p, q) for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters())
                  if not n.startswith("probe.")]
    assert any(p.grad is not None for _, p, _ in ssl_params)
    for name, p, q in ssl_params:
        assert torch.equal(p, q), f"{cls.name}: {name} depends on the labels"
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{cls.name}: {name}'s gradient depends on the labels"
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), f"{cls.name}: buffer {name} depends on the labels"
    assert not torch.equal(a.probe.weight, b.probe.weight)


TWO_STAGE = {"probe": "two-stage", "epochs": 3, "warmup_epochs": 0}


def test_two_stage_trains_the_ssl_networks_then_only_the_probe_on_frozen_features():
    method = build(SimCLR, {**SMALL[SimCLR], **TWO_STAGE, "ssl_epochs": 2})
    batch = mixed_batch(TASK, 8, generator=torch.Generator().manual_seed(14))
    state = lambda: {k: v.clone() for k, v in method.state_dict().items()}  # noqa: E731
    method.train()
    method.on_epoch_start(1, 3, 2)  # an SSL epoch: the encoder learns, the probe stays at its initialisation
    before = state()
    metrics = method.training_step(batch)
    after = state()
    assert "probe_loss" not in metrics
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("probe."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    method.on_epoch_start(2, 3, 2)  # the probe epoch: encoder, projector and BN statistics frozen
    probe = copy.deepcopy(method.probe)
    method.training_step(batch)
    after_probe = state()
    changed = [k for k, v in after.items() if not k.startswith("probe.") and not torch.equal(after_probe[k], v)]
    assert not changed, f"the probe stage changed {changed[:3]}"
    assert not torch.equal(method.probe.weight, probe.weight)
    # the probe's gradient is cross-entropy on the eval-mode encoder's features of the stream's images (no views)
    queries = batch.is_control.logical_not()
    frozen = copy.deepcopy(method.encoder).eval()
    with torch.no_grad():
        features = frozen(batch.images[queries])
    loss = F.cross_entropy(probe(features), batch.labels[queries])
    _close(method.probe.weight.grad, torch.autograd.grad(loss, probe.weight)[0], "probe-stage gradient")


@pytest.mark.parametrize("hparams,message", [
    (TWO_STAGE, r"probe=two-stage needs 1 <= ssl_epochs < epochs \(3\), got ssl_epochs=0"),
    ({**TWO_STAGE, "ssl_epochs": 3}, r"needs 1 <= ssl_epochs < epochs \(3\), got ssl_epochs=3"),
    ({"ssl_epochs": 2}, r"'ssl_epochs' applies to probe=two-stage only, got ssl_epochs=2 with probe=online"),
    ({**TWO_STAGE, "ssl_epochs": 1, "early_stop_patience": 2},
     r"probe=two-stage cannot stop early .* got early_stop_patience=2"),
    ({"probe": "linear"}, r"hyperparameter 'probe' must be one of online, two-stage, got 'linear'"),
])
def test_probe_settings_out_of_range_are_refused_in_one_line(hparams, message):
    with pytest.raises(MethodError, match=message):
        build(SimCLR, {**SMALL[SimCLR], **hparams})
