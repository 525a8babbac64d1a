"""GroupDRO, DANN and CS-ARM-BN against independent implementations of their references' equations.

Each reference below is written here from the equations (not from the reference code) and fed the same
inputs and noise as the project's method, in float64; outputs (q, losses, λ, logits) and gradients must
agree to 1e-5. References: WILDS groupDRO (github p-lambda/wilds examples/algorithms/groupDRO.py), Ganin
et al.'s λ_p schedule as run by github fungtion/DANN train/main.py, and the controls-only trainer of
github ml-jku/cs-arm-bn (plt/trainer/BEN.py). Declared options that differ from a reference are named
in a test of their own.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from platebench.methods import Batch, MethodError, TaskSpec
from platebench.methods.blocks.bn import bn_layers
from platebench.methods.cs_arm_bn import CSARMBN
from platebench.methods.dann import DANN
from platebench.methods.groupdro import GroupDRO
from platebench.methods.testing import TASK, build, mixed_batch, synthetic_batch

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    assert a.shape == b.shape and diff <= TOL, f"{what}: max |difference| {diff:.3g}"


# ---- GroupDRO: WILDS's update over the training groups -----------------------------------------
def _group_means(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """ℓ_g = mean over the rows of group g of −log softmax(logits)[label]; 0 for a group with no row."""
    nll = -logits.log_softmax(1).gather(1, labels[:, None])[:, 0]
    return torch.stack([nll[groups == g].mean() if bool((groups == g).any()) else nll.sum() * 0 for g in range(n)])


class WildsGroupDRO:
    """q₀ uniform over the training groups, 0 elsewhere; q ← q·exp(η ℓ) / Σ; loss = ℓ · q (q a constant)."""

    def __init__(self, n: int, train_groups: list[int], eta: float):
        self.q = torch.zeros(n, dtype=torch.float64)
        self.q[train_groups] = 1.0
        self.q /= self.q.sum()
        self.eta, self.n = eta, n

    def step(self, logits, labels, groups) -> torch.Tensor:
        ell = _group_means(logits, labels, groups, self.n)
        self.q = self.q * torch.exp(self.eta * ell.detach())
        self.q = self.q / self.q.sum()
        return ell @ self.q


def _groupdro(n: int = 5, **hp) -> GroupDRO:
    task = TaskSpec(num_classes=3, channels=5, image_size=(16, 16), num_domains={"plate": 6, "batch": n})
    return build(GroupDRO, {"step_size": 0.3, **hp}, task=task).double()


def _group_steps(group_sets: list[list[int]], rows_per_group: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for groups in group_sets:
        ids = torch.tensor(groups).repeat_interleave(rows_per_group)
        logits = (torch.randn(len(ids), 3, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
        yield logits, torch.randint(3, (len(ids),), generator=g), ids


def test_groupdro_equals_wilds_when_every_training_group_is_in_the_first_step():
    method, train = _groupdro(), [0, 1, 3]  # groups 2 and 4 are validation/test ids: never in training batches
    ref = WildsGroupDRO(5, train, 0.3)
    for step, (logits, labels, groups) in enumerate(_group_steps([[0, 1, 3], [0, 3], [1], [0, 1, 3], [3]])):
        got, want = method.robust_loss(logits, labels, groups), ref.step(logits, labels, groups)
        _close(method.q, ref.q, f"q after step {step}")
        _close(got.detach(), want.detach(), f"loss at step {step}")
        _close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0], f"∂loss/∂logits {step}")
    assert float(method.q[2]) == float(method.q[4]) == 0.0


def test_groupdro_equals_wilds_once_every_training_group_was_seen_and_is_its_renormalisation_before():
    method, train = _groupdro(), [0, 1, 3]
    ref = WildsGroupDRO(5, train, 0.3)
    seen: set[int] = set()
    for step, (logits, labels, groups) in enumerate(_group_steps([[0], [0, 1], [1], [1, 3], [0, 3], [0, 1, 3]])):
        seen |= set(groups.tolist())
        got, want = method.robust_loss(logits, labels, groups), ref.step(logits, labels, groups)
        mass = ref.q[sorted(seen)].sum()  # WILDS's weight on the groups seen so far (1 once all were seen)
        expect_q = torch.zeros(5, dtype=torch.float64)
        expect_q[sorted(seen)] = ref.q[sorted(seen)] / mass
        _close(method.q, expect_q, f"q after step {step}")
        _close(got.detach(), want.detach() / mass, f"loss at step {step}")
        if seen == set(train):
            _close(method.q, ref.q, f"q after step {step} (all training groups seen)")
            _close(got.detach(), want.detach(), f"loss at step {step} (all training groups seen)")
    assert seen == set(train)


def test_groupdro_training_step_loss_is_wilds_on_the_networks_logits_and_q_survives_a_checkpoint():
    method = build(GroupDRO, {"plates_per_step": 4, "step_size": 0.5}).double()
    gen = torch.Generator().manual_seed(3)
    batches = [synthetic_batch(TASK, p, 4, 0, gen) for p in (0, 1, 2, 3)]  # batch ids 0, 0, 1, 1; id 2 unseen
    for b in batches:
        b.images = b.images.double()
    ref = WildsGroupDRO(3, [0, 1], 0.5)
    for step in range(3):
        shadow = copy.deepcopy(method.network).train()
        whole = Batch.concat(batches)
        want = ref.step(shadow(whole.images), whole.labels, whole.domains["batch"])
        got = method.training_step(batches)["loss"]
        assert abs(got - float(want.detach())) <= TOL, (step, got, float(want.detach()))
        _close(method.q, ref.q, f"q after training step {step}")
    restored = build(GroupDRO, {"plates_per_step": 4, "step_size": 0.5}, seed=1).double()
    restored.load_checkpoint_state(copy.deepcopy(method.checkpoint_state()))
    _close(restored.q, method.q, "q after the checkpoint round trip")
    logits, labels, groups = next(_group_steps([[0, 1]]))
    _close(restored.robust_loss(logits, labels, groups).detach(), method.robust_loss(logits, labels, groups).detach(),
           "loss after the checkpoint round trip")


def test_groupdro_option_q_groups_all_is_uniform_over_every_id_not_wilds():
    method = _groupdro(q_groups="all")
    former, wilds = WildsGroupDRO(5, [0, 1, 2, 3, 4], 0.3), WildsGroupDRO(5, [0, 1, 3], 0.3)
    for step, (logits, labels, groups) in enumerate(_group_steps([[0, 1, 3], [1, 3]])):
        got, want, ref = (method.robust_loss(logits, labels, groups), former.step(logits, labels, groups),
                          wilds.step(logits, labels, groups))
        _close(method.q, former.q, f"q (all ids) after step {step}")
        _close(got.detach(), want.detach(), f"loss (all ids) at step {step}")
        assert float(got.detach()) < float(ref.detach()) - 1e-3  # the validation/test ids' weight scales the loss down
    assert float(method.q[2]) > 0.0


def test_groupdro_rejects_unknown_q_groups_naming_key_and_value():
    with pytest.raises(MethodError, match=r"'q_groups'.*'train'"):
        _groupdro(q_groups="train")


# ---- DANN: Ganin's λ_p and the reversed gradient --------------------------------------------------
def ganin(p: float) -> float:
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def _dann(**hp) -> DANN:
    return build(DANN, {"batch_size": 6, **hp})


def _run_epochs(method: DANN, epochs: int, steps: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(4)
    batch = mixed_batch(TASK, 6, 0, gen)
    out = []
    for epoch in range(epochs):
        method.on_epoch_start(epoch, epochs, steps)
        out.append([method.training_step(batch)["grl_coeff"] for _ in range(steps)])
    return out


def test_dann_lambda_is_ganins_schedule_at_every_update():
    epochs, steps = 3, 4
    got = _run_epochs(_dann(), epochs, steps)
    for e in range(epochs):
        for i in range(steps):
            want = ganin((i + e * steps) / (epochs * steps))  # fungtion/DANN: p = (i + e·S) / (E·S)
            assert abs(got[e][i] - want) <= TOL, (e, i, got[e][i], want)
    assert got[0][0] == 0.0  # p = 0 at the very first update, as in the reference
    assert got[0][1] > 0.05  # and λ rises within epoch 0 (it used to stay 0 for the whole first epoch)


def test_dann_lambda_after_a_resume_continues_the_schedule():
    """A worker restarted from the checkpoint of epoch 1 (of 3) replays epoch 2 from its start: λ as if never
    interrupted."""
    method, steps = _dann(), 3
    straight = _run_epochs(method, 3, steps)
    resumed = _dann()
    resumed.load_checkpoint_state(copy.deepcopy(method.checkpoint_state()))
    resumed.on_epoch_start(2, 3, steps)
    batch = mixed_batch(TASK, 6, 0, torch.Generator().manual_seed(4))
    assert [resumed.training_step(batch)["grl_coeff"] for _ in range(steps)] == pytest.approx(straight[2])


def test_dann_lambda_is_zero_without_epoch_information():
    """A bare loop that never calls on_epoch_start: progress unknown, λ = 0 (the reference's first update)."""
    assert [_dann().training_step(mixed_batch(TASK, 6, 0, torch.Generator().manual_seed(4)))["grl_coeff"]
            for _ in range(2)] == [0.0, 0.0]


def test_dann_option_constant_schedule_is_wilds_lambda_one_from_the_first_update():
    got = _run_epochs(_dann(grl_schedule="constant"), 2, 3)
    assert all(v == 1.0 for epoch in got for v in epoch)
    assert _run_epochs(_dann(grl_schedule="constant", grl_max=0.3), 1, 2) == [[0.3, 0.3]]


def test_dann_loss_and_gradients_equal_the_reversed_gradient_equations():
    method = _dann(penalty_weight=0.7).double()
    method.on_epoch_start(1, 4, 5)
    lam = ganin(0.25)
    assert method.grl.coeff == pytest.approx(lam, abs=1e-12)
    batch = mixed_batch(TASK, 6, 0, torch.Generator().manual_seed(6))
    batch.labels[2] = -1  # an unlabelled row: no class loss, still a domain row
    x = batch.images.double().requires_grad_(True)
    batch.images = x
    params = list(method.network.parameters()) + list(method.discriminator.parameters())
    torch.manual_seed(12)  # the discriminator's dropout draws: identical in both forwards
    total, _ = method.losses(batch)
    got = torch.autograd.grad(total, [x, *params])

    torch.manual_seed(12)
    z = method.network.featurizer(x)
    logits, d_logits = method.network.classifier(z), method.discriminator(z)  # no reversal: applied by hand
    labelled = batch.labels >= 0
    ce = -logits.log_softmax(1)[labelled].gather(1, batch.labels[labelled, None]).mean()
    d_ce = -d_logits.log_softmax(1).gather(1, batch.domains["batch"][:, None]).mean()
    _close(total.detach(), (ce + 0.7 * d_ce).detach(), "DANN loss")
    g_ce = torch.autograd.grad(ce, [x, *params], retain_graph=True, allow_unused=True)
    g_d = torch.autograd.grad(d_ce, [x, *params], allow_unused=True)
    n_feat = 1 + len(list(method.network.parameters()))
    for i, (a, c, d) in enumerate(zip(got, g_ce, g_d)):
        c = torch.zeros_like(a) if c is None else c
        d = torch.zeros_like(a) if d is None else d
        # featurizer side (input, network): ∂CE/∂· − λ·w·∂CE_d/∂·; discriminator: w·∂CE_d/∂θ_D (not reversed)
        want = c - lam * 0.7 * d if i < n_feat else 0.7 * d
        _close(a, want, "∂loss/∂input" if i == 0 else f"∂loss/∂parameter {i}")


def test_dann_rejects_out_of_range_values_naming_key_and_value():
    for key, value in (("grl_schedule", "linear"), ("grl_max", -1.0), ("disc_dropout", 1.5),
                       ("penalty_weight", -0.5), ("disc_lr_mult", 0.0), ("disc_hidden", 0)):
        with pytest.raises(MethodError, match=rf"'{key}'.*{re.escape(repr(value))}"):
            _dann(**{key: value})


# ---- CS-ARM-BN: BN statistics by hand -----------------------------------------------------------
def _bn_by_hand(net: torch.nn.Module, rule) -> None:
    """Replace every BN layer's forward by `rule(layer, x)` (the test's own normalisation)."""
    for m in bn_layers(net):
        m.forward = (lambda x, _m=m: rule(_m, x))


def _affine(m, x_hat):
    return x_hat * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def _moments(x, unbiased: bool):
    dims = (0, 2, 3)
    return x.mean(dims), x.var(dims, unbiased=unbiased)


def ben_trainer_logits(net: torch.nn.Module, controls: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Official controls-only trainer, from its equations: running stats reset to (0, 1); the controls pass
    normalises each layer with its batch statistics (biased variance) and moves the running stats one step
    of momentum 0.1 (unbiased variance), without gradient; the queries are normalised with those running
    stats (eval)."""
    ref = copy.deepcopy(net)
    running = {}

    def fill(m, x):
        mean, var_b = _moments(x, unbiased=False)
        _, var_u = _moments(x, unbiased=True)
        running[id(m)] = (0.9 * 0.0 + 0.1 * mean, 0.9 * 1.0 + 0.1 * var_u)
        return _affine(m, (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var_b.view(1, -1, 1, 1) + m.eps))

    def apply(m, x):
        mean, var = running[id(m)]
        return _affine(m, (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + m.eps))

    _bn_by_hand(ref, fill)
    with torch.no_grad():
        ref(controls)
    _bn_by_hand(ref, apply)
    return ref, ref(queries)


def batch_stats_logits(net: torch.nn.Module, x: torch.Tensor, rows: torch.Tensor):
    """Every layer normalises all rows with the biased batch statistics of `rows` (gradient through them)."""
    ref = copy.deepcopy(net)

    def rule(m, h):
        mean, var = _moments(h[rows], unbiased=False)
        return _affine(m, (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + m.eps))

    _bn_by_hand(ref, rule)
    return ref, ref(x)


def _cs(stats_from: str) -> CSARMBN:
    method = build(CSARMBN, {"stats_from": stats_from, "batch_size": 6, "n_controls": 9, "eval_n_controls": 9,
                             "plates_per_step": 1}).double()
    with torch.no_grad():  # BN affine parameters away from (1, 0), so a wrong γ/β use would show
        for m in bn_layers(method.network):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return method


def _cs_batch(seed: int) -> Batch:
    batch = synthetic_batch(TASK, 2, 6, 9, torch.Generator().manual_seed(seed))
    batch.images = batch.images.double()
    return batch


def _check_against(method: CSARMBN, batch: Batch, reference) -> None:
    """predict (eval) and the training loss's gradients (input, parameters) equal the reference's."""
    q = batch.queries
    ref, want = reference(method.network, batch)
    method.eval()
    with torch.no_grad():
        _close(method.predict(batch), want.detach(), f"{method.hparams['stats_from']}: query logits")
    method.train()
    x = batch.images.clone().requires_grad_(True)
    batch.images = x
    loss, _ = method.plate_loss(batch)
    _close(loss.detach(), F.cross_entropy(want, batch.labels[q]).detach(), "query loss")
    params = [p for _, p in sorted(method.network.named_parameters())]
    got = torch.autograd.grad(loss, [x, *params])
    x_ref = batch.images.detach().clone().requires_grad_(True)
    batch.images = x_ref
    ref, logits = reference(method.network, batch)
    ref_params = [p for _, p in sorted(ref.named_parameters())]
    want_g = torch.autograd.grad(F.cross_entropy(logits, batch.labels[q]), [x_ref, *ref_params], allow_unused=True)
    want_g = [torch.zeros_like(a) if b is None else b for a, b in zip(got, want_g)]
    for i, (a, b) in enumerate(zip(got, want_g)):
        _close(a, b, "∂loss/∂images" if i == 0 else f"∂loss/∂parameter {i}")


def test_cs_arm_bn_controls_is_the_official_ben_trainer():
    def reference(net, batch):
        return ben_trainer_logits(net, batch.images[batch.is_control].detach(), batch.images[batch.queries])

    method, batch = _cs("controls"), _cs_batch(30)
    buffers = {k: v.clone() for k, v in method.network.named_buffers()}
    _check_against(method, batch, reference)
    for k, v in method.network.named_buffers():
        assert torch.equal(v, buffers[k]), f"{k}: the method's own BN buffers must be left as they were"
    x = batch.images.detach().clone().requires_grad_(True)
    batch.images = x
    method.plate_loss(batch)[0].backward()
    assert float(x.grad[batch.is_control].abs().max()) == 0.0  # no gradient through the statistics


def test_cs_arm_bn_default_pools_queries_and_controls_with_gradient_through_the_statistics():
    def reference(net, batch):
        ref, logits = batch_stats_logits(net, batch.images, torch.ones(len(batch), dtype=torch.bool))
        return ref, logits[batch.queries]

    _check_against(_cs("queries+controls"), _cs_batch(31), reference)


def test_cs_arm_bn_option_controls_batch_stats_is_the_former_mode_not_the_official_one():
    def former(net, batch):
        ref, logits = batch_stats_logits(net, batch.images, batch.is_control)
        return ref, logits[batch.queries]

    method, batch = _cs("controls-batch-stats"), _cs_batch(32)
    _check_against(method, batch, former)
    _, official = ben_trainer_logits(method.network, batch.images[batch.is_control].detach(),
                                     batch.images[batch.queries].detach())
    method.eval()
    with torch.no_grad():
        assert float((method.predict(batch) - official).abs().max()) > 1e-3


def test_cs_arm_bn_rejects_unknown_stats_from_naming_key_and_value():
    with pytest.raises(MethodError, match=r"stats_from.*controls-batch-stats.*'controls-only'"):
        _cs("controls-only")
