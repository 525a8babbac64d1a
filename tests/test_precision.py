"""Precision and compile as run settings: the float32 guard, the fp16 loss scaling, run ids, flags, compile."""

from __future__ import annotations

import io

import pytest
import torch
from platebench.harness.train.run_identity import SETTING_DEFAULTS, run_id_of
from platebench.harness.train.runspec import RunSpec
from platebench.methods import testing
from platebench.methods.ben import BEN
from platebench.methods.blocks.divergence import js_divergence_logits
from platebench.methods.blocks.margins import arcface_logits
from platebench.methods.blocks.style import instance_stats
from platebench.methods.compiling import compile_backbones
from platebench.methods.erm import ERM
from platebench.methods.errors import MethodError
from platebench.methods.network import masked_cross_entropy
from platebench.methods.precision import DEFAULT_PRECISION, autocast, full_precision

BF16 = autocast("bf16-mixed", "cpu")


# ---- the float32 guard -------------------------------------------------------------------------------
def test_guarded_blocks_compute_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(4, 3, 5, 5, generator=g).bfloat16()
    cos = torch.rand(4, 3, generator=g).bfloat16() * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])
    logits_a, logits_b = (torch.randn(4, 3, generator=g).bfloat16() * 10 for _ in range(2))
    with autocast("bf16-mixed", "cpu"):
        mu, sigma = instance_stats(fmap, 1e-6, unbiased=True)
        arc = arcface_logits(cos, labels, 0.3, 30.0)
        js = js_divergence_logits(logits_a, logits_b, reduction="none")
        plain = torch.nn.functional.linear(fmap.flatten(1).float(), torch.ones(2, 75))  # unguarded: low precision
    assert plain.dtype == torch.bfloat16
    assert {t.dtype for t in (mu, sigma, arc, js)} == {torch.float32}
    # ... and equal to the float32 computation on the same (bf16-valued) inputs
    var, mean = torch.var_mean(fmap.float(), dim=(2, 3), keepdim=True, correction=1)
    assert torch.equal(mu, mean) and torch.equal(sigma, torch.sqrt(var + 1e-6))
    assert torch.equal(js, js_divergence_logits(logits_a.float(), logits_b.float(), reduction="none"))
    assert torch.equal(arc, arcface_logits(cos.float(), labels, 0.3, 30.0))


def test_autocast_already_keeps_the_cross_entropy_in_float32():
    # what methods/precision.py relies on instead of guarding masked_cross_entropy again
    logits = torch.randn(4, 3).bfloat16()
    with autocast("bf16-mixed", "cpu"):
        loss = masked_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.bool))
    assert loss.dtype == torch.float32


def test_the_guard_is_a_plain_call_without_autocast_and_keeps_float64():
    seen = []

    @full_precision
    def block(x):
        seen.append(x)
        return x

    low, wide = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)
    assert block(low) is low  # fp32 runs compute exactly what they did before
    with autocast("bf16-mixed", "cpu"):
        assert block(low).dtype == torch.float32 and block(wide) is wide


def test_gradients_flow_through_the_guard_to_low_precision_inputs():
    x = torch.randn(3, 2, 4, 4).bfloat16().requires_grad_()
    with autocast("bf16-mixed", "cpu"):
        mu, sigma = instance_stats(x, 1e-6)
    (mu.sum() + sigma.sum()).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and bool(torch.isfinite(x.grad).all())


def test_backward_of_a_guarded_block_stays_float32_under_autocast():
    """Method.backward leaves autocast: on CPU the backward runs in the caller's thread, where an active autocast
    would recompute a float32-guarded block's weight gradient as a bfloat16 matmul."""
    from types import SimpleNamespace

    from platebench.methods.base import Method

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(64, 64), torch.randn(32, 64)
    energy = full_precision(lambda v: lin(v).pow(2).sum())
    energy(x).backward()
    want, lin.weight.grad = lin.weight.grad.clone(), None
    with BF16:
        Method.backward(SimpleNamespace(_grad_scaler=None), energy(x))
    assert torch.equal(lin.weight.grad, want)


def test_autocast_refuses_an_unknown_precision():
    with pytest.raises(MethodError, match="precision must be one of fp32, bf16-mixed, fp16-mixed, got 'fp8'"):
        autocast("fp8", "cpu")


# ---- fp16-mixed: loss scaling ------------------------------------------------------------------------
def _sgd(cls=ERM, **hp):
    return testing.build(cls, {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, **hp}, seed=3)


def _params(method):
    return {k: v.detach().clone() for k, v in method.named_parameters()}


def test_fp16_step_with_infinite_gradients_is_skipped_and_lowers_the_scale():
    method = _sgd()
    method.set_precision("fp16-mixed")
    scale = method._grad_scaler.get_scale()
    before = _params(method)
    weight = method.network.classifier.weight
    method.optimizer_step(method.optimizers[0], weight.sum() * float("inf"))
    assert all(torch.equal(v, before[k]) for k, v in method.named_parameters())
    assert method._grad_scaler.get_scale() == scale / 2


def test_fp16_scaled_step_equals_the_fp32_step():
    # scales are powers of two: scaling and unscaling a float32 gradient is exact
    batch = testing.training_batches(_sgd(), torch.Generator().manual_seed(1))
    steps = {}
    for precision in ("fp32", "fp16-mixed"):
        method = _sgd()
        method.set_precision(precision)
        method.training_step(batch)
        steps[precision] = _params(method)
    assert steps["fp32"].keys() == steps["fp16-mixed"].keys()
    for key, value in steps["fp32"].items():
        assert torch.equal(value, steps["fp16-mixed"][key]), key


def test_fp16_gradient_accumulation_scales_every_plate_backward():
    # BEN accumulates one backward per plate, then optimizer_step(opt, None): the same update as under fp32
    batches = testing.training_batches(_sgd(BEN, plates_per_step=2), torch.Generator().manual_seed(2))
    steps = {}
    for precision in ("fp32", "fp16-mixed"):
        method = _sgd(BEN, plates_per_step=2)
        method.set_precision(precision)
        method.training_step(batches)
        steps[precision] = _params(method)
    start = _params(_sgd(BEN, plates_per_step=2))
    assert any(not torch.equal(v, start[k]) for k, v in steps["fp32"].items())
    for key, value in steps["fp32"].items():
        assert torch.equal(value, steps["fp16-mixed"][key]), key


def test_grad_scaler_state_round_trips_through_a_tensors_only_checkpoint():
    method = _sgd()
    method.set_precision("fp16-mixed")
    method.optimizer_step(method.optimizers[0], method.network.classifier.weight.sum() * float("inf"))
    buffer = io.BytesIO()
    torch.save(method.checkpoint_state(), buffer)
    buffer.seek(0)
    restored = _sgd()
    restored.set_precision("fp16-mixed")
    restored.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert restored._grad_scaler.get_scale() == method._grad_scaler.get_scale() == 2.0 ** 15


def test_fp16_mixed_training_on_cpu_lowers_the_loss():
    method = testing.build(ERM)
    method.set_precision("fp16-mixed")
    batch = testing.training_batches(method, torch.Generator().manual_seed(0))
    with autocast("fp16-mixed", "cpu"):
        losses = [method.training_step(batch)["loss"] for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses


# ---- run settings: ids, flags, suites ------------------------------------------------------------------
def _spec(**settings) -> RunSpec:
    return RunSpec(data="/d", dataset="d", dataset_checksum="c", split_scheme="new_batches", method="erm",
                   hparams={"lr": 0.1}, backbone="resnet-tiny", seed=0, code={"version": "v", "source": "s"},
                   **settings)


def test_precision_and_compile_change_the_run_and_training_ids():
    base = _spec()
    others = [_spec(precision="bf16-mixed"), _spec(precision="fp16-mixed"), _spec(compile=True)]
    assert len({base.run_id, *(s.run_id for s in others)}) == 4
    assert len({base.training().training_id, *(s.training().training_id for s in others)}) == 4


def test_default_settings_keep_the_id_of_a_spec_stored_before_they_existed():
    assert SETTING_DEFAULTS["precision"] == DEFAULT_PRECISION
    stored = {k: v for k, v in _spec().to_dict().items() if k not in ("precision", "compile")}
    assert run_id_of(stored) == _spec().run_id == RunSpec.from_dict(stored).run_id
    assert RunSpec.from_dict(_spec(precision="bf16-mixed").to_dict()).run_id == _spec(precision="bf16-mixed").run_id


def test_a_bad_precision_is_one_argparse_line_naming_the_value(capsys):
    from platebench.harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", "/nowhere", "--method", "erm", "--precision", "fp8"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "argument --precision: invalid choice: 'fp8'" in last


def test_a_suite_sets_the_run_settings_and_refuses_bad_ones():
    from platebench.harness.errors import HarnessError
    from platebench.harness.suite import Suite

    base = {"name": "s", "dataset": {"preset": "quickstart"}, "split_scheme": "new_batches", "methods": ["erm"]}
    suite = Suite.from_dict({**base, "precision": "bf16-mixed", "compile": True}, "s.yaml")
    assert (suite.precision, suite.compile) == ("bf16-mixed", True)
    assert (Suite.from_dict(base, "s.yaml").precision, Suite.from_dict(base, "s.yaml").compile) == ("fp32", False)
    with pytest.raises(HarnessError, match="s.yaml: precision must be one of fp32, bf16-mixed, fp16-mixed, got 'fp8'"):
        Suite.from_dict({**base, "precision": "fp8"}, "s.yaml")
    with pytest.raises(HarnessError, match="s.yaml: compile must be true or false, got 'yes'"):
        Suite.from_dict({**base, "compile": "yes"}, "s.yaml")


def test_leaderboard_settings_name_the_runs_precisions():
    from platebench.harness.results.leaderboard import run_settings

    done = {"a": {"spec": _spec().to_dict()}, "b": {"spec": {"method": "erm"}},  # b: stored before the settings
            "c": {"spec": _spec(precision="bf16-mixed").to_dict()}}
    assert run_settings(["a", "b"], done) == {"precision": ["fp32"], "compile": [False]}
    assert run_settings(["a", "c", "no-marker"], done) == {"precision": ["bf16-mixed", "fp32"], "compile": [False]}


# ---- compile ---------------------------------------------------------------------------------------------
def test_compile_keeps_state_dict_names():
    method = testing.build(ERM)
    keys = list(method.state_dict())
    assert compile_backbones(method) == 1
    assert list(method.state_dict()) == keys and method.network.featurizer._compiled_call_impl is not None


@pytest.mark.slow  # torch.compile needs a C++ compiler and tens of seconds on CPU
def test_compiled_backbone_computes_what_the_eager_one_does():
    from platebench.methods.backbones import build_backbone

    torch.manual_seed(0)
    eager = build_backbone("resnet-tiny", 3).eval()
    compiled = build_backbone("resnet-tiny", 3).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_backbones(compiled)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), atol=1e-5)
