"""Evaluation protocol choices that records depend on (no training needed)."""

from platebench.datasets.shards import open_dataset
from platebench.harness.train.evaluate import Evaluator
from platebench.harness.train.runspec import build_specs, task_spec
from platebench.methods import get_method
from shard_fixtures import build_tiny_dataset


def _evaluator(tmp_path, method, hparams):
    ds = open_dataset(build_tiny_dataset(tmp_path / "ds"))
    spec = build_specs(ds, "new_batches", method, hparams, [0], "resnet-tiny")[0]
    instance = get_method(method)(task_spec(ds), spec.hparams, "resnet-tiny")
    return Evaluator(ds, spec, instance)


def test_standard_methods_use_the_fixed_eval_batch_and_tta_methods_their_own(tmp_path):
    assert _evaluator(tmp_path, "erm", {"batch_size": 8}).main_batch == 64
    tta = _evaluator(tmp_path, "arm-bn", {"batch_size": 8})
    assert (tta.track, tta.main_batch, tta.main_controls) == ("tta", 8, 0)


def test_adabn_evaluates_whole_plates_by_default_and_batches_on_request(tmp_path):
    assert _evaluator(tmp_path, "adabn", {}).main_batch == 0  # 0 = the whole plate (the reference form)
    assert _evaluator(tmp_path, "adabn", {"adapt": "batch", "batch_size": 8}).main_batch == 8


def test_control_context_methods_evaluate_with_their_controls(tmp_path):
    ev = _evaluator(tmp_path, "cs-arm-bn", {"eval_n_controls": 6, "batch_size": 4})
    assert (ev.main_batch, ev.main_controls) == (4, 6)
    assert ev.splits == ["val", "id_test", "test"] and ev.scheme.role("val") == "val"
