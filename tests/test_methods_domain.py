"""DANN, Deep CORAL, GroupDRO and IRM: penalties against references, schedules, resume state."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_methods_b import TASK, plate_batch, plates
from platebench.methods import Batch, MethodError, TaskSpec, get_method
from platebench.methods.coral import coral_penalty
from platebench.methods.dann import ganin_lambda
from platebench.methods.irm import irm_objective, irm_penalty
from platebench.methods.network import masked_cross_entropy


def _make(name, task=TASK, **hp):
    torch.manual_seed(0)
    return get_method(name)(task, hp, "resnet-tiny").train()


# ---- CORAL ------------------------------------------------------------------------------------------------
def test_coral_penalty_matches_numpy_reference():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 4)) + i for i, n in enumerate((5, 6, 7))]
    ref = np.mean([np.mean((a.mean(0) - b.mean(0)) ** 2) + np.mean((np.cov(a.T) - np.cov(b.T)) ** 2)
                   for a, b in itertools.combinations(feats, 2)])
    z = torch.tensor(np.concatenate(feats))
    groups = torch.tensor(np.repeat([0, 1, 2], (5, 6, 7)))
    assert float(coral_penalty(z, groups)) == pytest.approx(ref, rel=1e-9)


def test_coral_penalty_zero_for_identical_groups_positive_after_shift_and_permutation_invariant():
    torch.manual_seed(0)
    a = torch.randn(6, 5)
    groups = torch.tensor([0] * 6 + [1] * 6)
    assert float(coral_penalty(torch.cat([a, a]), groups)) == 0.0
    assert float(coral_penalty(torch.cat([a, a + 0.5]), groups)) > 0.0
    b = torch.randn(6, 5) * 2
    z = torch.cat([a, b])
    shuffled = torch.cat([a[torch.randperm(6)], b[torch.randperm(6)]])
    assert torch.allclose(coral_penalty(z, groups), coral_penalty(shuffled, groups), atol=1e-6)
    singleton = torch.cat([z, torch.randn(1, 5) * 100])  # a one-row group has no covariance and is skipped
    assert torch.allclose(coral_penalty(singleton, torch.cat([groups, torch.tensor([2])])), coral_penalty(z, groups))


def test_coral_method_penalises_the_plates_of_the_step():
    with pytest.raises(MethodError, match="plates_per_step"):
        _make("coral", plates_per_step=1)
    method = _make("coral", plates_per_step=2, batch_size=16)
    batches = plates(0, 1, shift=1.0)
    method.training_step(batches)  # first step moves BN buffers; the penalty is computed in train mode
    snapshot = get_method("coral")(TASK, {"plates_per_step": 2, "batch_size": 16}, "resnet-tiny").train()
    snapshot.load_state_dict(method.state_dict())
    with torch.no_grad():
        z = snapshot.network.featurizer(Batch.concat(batches).images)
    expected = coral_penalty(z, torch.tensor([0] * 8 + [1] * 8))
    assert method.training_step(batches)["penalty"] == pytest.approx(float(expected), rel=1e-4)


# ---- GroupDRO ------------------------------------------------------------------------------------------
def _group_logits():
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    logits = torch.zeros(6, 4)
    logits[torch.arange(3, 6), labels[3:]] = 5.0  # group 1 (rows 3..5) is easy, group 0 is hard
    return logits, labels, torch.tensor([0, 0, 0, 1, 1, 1])


def test_groupdro_shifts_weight_to_the_higher_loss_group_and_q_stays_a_distribution():
    method = _make("groupdro", step_size=0.1)
    logits, labels, groups = _group_logits()
    losses = [float(F.cross_entropy(logits[groups == g], labels[groups == g])) for g in (0, 1)]
    loss = method.robust_loss(logits, labels, groups)
    q = torch.tensor([math.exp(0.1 * losses[0]), math.exp(0.1 * losses[1]), 0.0])  # group 2 never seen: weight 0
    q = q / q.sum()
    assert torch.allclose(method.q, q, atol=1e-6)
    assert float(loss) == pytest.approx(float(q[0] * losses[0] + q[1] * losses[1]), rel=1e-5)
    for _ in range(5):
        method.robust_loss(logits, labels, groups)
        assert float(method.q.sum()) == pytest.approx(1.0, abs=1e-6)
    assert method.q[0] > 1 / 2 > method.q[1] and method.q[2] == 0


def test_groupdro_with_zero_step_keeps_uniform_q_over_seen_groups_and_absent_groups_add_nothing():
    method = _make("groupdro", step_size=0.0)
    logits, labels, groups = _group_logits()
    loss = method.robust_loss(logits, labels, groups)
    assert torch.equal(method.q, torch.tensor([0.5, 0.5, 0.0]))
    per_group = sum(float(F.cross_entropy(logits[groups == g], labels[groups == g])) for g in (0, 1))
    assert float(loss) == pytest.approx(per_group / 2, rel=1e-6)


def test_groupdro_q_groups_all_keeps_the_former_uniform_q_over_every_id():
    method = _make("groupdro", step_size=0.0, q_groups="all")
    logits, labels, groups = _group_logits()
    loss = method.robust_loss(logits, labels, groups)
    assert torch.allclose(method.q, torch.full((3,), 1 / 3))
    per_group = sum(float(F.cross_entropy(logits[groups == g], labels[groups == g])) for g in (0, 1))
    assert float(loss) == pytest.approx(per_group / 3, rel=1e-6)


def test_groupdro_errors_name_the_problem():
    method = _make("groupdro")
    logits, labels, _ = _group_logits()
    with pytest.raises(MethodError, match="out of range 0..2"):
        method.robust_loss(logits, labels, torch.tensor([0, 0, 0, 5, 5, 5]))
    with pytest.raises(MethodError, match="'batch'"):
        _make("groupdro", task=TaskSpec(num_classes=4, channels=5, num_domains={"plate": 6}))
    with pytest.raises(MethodError, match="'lab'"):
        _make("groupdro", domain_kind="lab")
    with pytest.raises(MethodError, match=r"'q_groups'.*'train'"):
        _make("groupdro", q_groups="train")
    with pytest.raises(MethodError, match=r"'step_size'.*-0.1"):
        _make("groupdro", step_size=-0.1)


# ---- IRM -------------------------------------------------------------------------------------------------
def test_irm_penalty_with_identical_halves_is_squared_risk_gradient_by_finite_difference():
    g = torch.Generator().manual_seed(0)
    half_logits = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    half_labels = torch.randint(4, (5,), generator=g)
    logits, labels = half_logits.repeat_interleave(2, 0), half_labels.repeat_interleave(2)

    def risk(w):
        return float(F.cross_entropy(w * half_logits, half_labels))

    h = 1e-5
    grad = (risk(1 + h) - risk(1 - h)) / (2 * h)
    assert float(irm_penalty(logits, labels).detach()) == pytest.approx(grad**2, rel=1e-6)


def test_irm_objective_averages_group_risks_and_penalties():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 4), torch.randint(4, (10,))
    groups = torch.tensor([0] * 6 + [1] * 4)
    total, risk, penalty = irm_objective(logits, labels, groups, penalty_weight=10.0)
    risks = [F.cross_entropy(logits[groups == k], labels[groups == k]) for k in (0, 1)]
    pens = [irm_penalty(logits[groups == k], labels[groups == k]) for k in (0, 1)]
    assert float(risk) == pytest.approx(float(sum(risks) / 2), rel=1e-6)
    assert float(penalty.detach()) == pytest.approx(float(sum(pens).detach() / 2), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float((risk + 10.0 * penalty).detach()), rel=1e-6)


def test_irm_switches_penalty_weight_and_resets_the_optimiser_exactly_at_the_anneal_step():
    method = _make("irm", anneal_steps=2, penalty_weight=10.0, domain_kind="plate", plates_per_step=2,
                   batch_size=16)
    opt = method.optimizers[0]
    conv = method.network.featurizer.conv1.weight

    weights, adam_steps = [], []
    for step in range(4):
        weights.append(method.training_step(plates(step, step + 1))["penalty_weight"])
        adam_steps.append(int(opt.state[conv]["step"]))
    assert weights == [1.0, 1.0, 10.0, 10.0]
    assert adam_steps == [1, 2, 1, 2]  # fresh optimiser state at update number 2
    resumed = _make("irm", anneal_steps=2, penalty_weight=10.0, domain_kind="plate", plates_per_step=2,
                    batch_size=16)
    resumed.load_checkpoint_state(method.checkpoint_state())
    assert resumed.update_count == 4 and resumed.current_penalty_weight() == 10.0


# ---- DANN ------------------------------------------------------------------------------------------------
def test_dann_with_zero_weight_gives_erm_gradients():
    dann, erm = _make("dann", penalty_weight=0.0, disc_dropout=0.0), _make("erm")
    dann.grl.coeff = 1.0
    assert all(torch.equal(a, b) for a, b in zip(dann.network.parameters(), erm.network.parameters()))
    batch = Batch.concat(plates(0, 2, 4, n=4))
    dann.losses(batch)[0].backward()
    mask = batch.labels >= 0
    masked_cross_entropy(erm.network(batch.images), batch.labels, mask).backward()
    for a, b in zip(dann.network.parameters(), erm.network.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_dann_discriminator_gradient_is_not_reversed():
    dann = _make("dann", penalty_weight=0.5, disc_dropout=0.0)
    dann.grl.coeff = 0.7
    batch = Batch.concat(plates(0, 2, 4, n=4))
    dann.losses(batch)[0].backward()
    with_grl = [p.grad.clone() for p in dann.discriminator.parameters()]
    dann.zero_grad()
    z = dann.network.featurizer(batch.images).detach()
    (0.5 * F.cross_entropy(dann.discriminator(z), batch.domains["batch"])).backward()
    for a, p in zip(with_grl, dann.discriminator.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in dann.discriminator.parameters())


def test_dann_ganin_schedule_follows_progress():
    assert ganin_lambda(0.0) == 0.0 and ganin_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    dann = _make("dann", grl_max=1.0)
    dann.on_epoch_start(0, 4, 3)
    assert dann.grl.coeff == 0.0
    for i in range(3):
        dann.training_step(plate_batch(i))
    dann.on_epoch_start(1, 4, 3)
    assert dann.grl.coeff == pytest.approx(ganin_lambda(0.25))
    dann.training_step(plate_batch(3))
    dann._update_coeff()
    assert dann.grl.coeff == pytest.approx(ganin_lambda((1 + 1 / 3) / 4))
    lrs = [g["lr"] for g in dann.optimizers[0].param_groups]
    assert lrs == pytest.approx([1e-3, 1e-4])


def test_dann_needs_domain_ids_of_its_kind():
    dann = _make("dann", domain_kind="source")
    batch = plate_batch(0)
    batch.domains.pop("source")
    with pytest.raises(MethodError, match="'source'"):
        dann.training_step(batch)
