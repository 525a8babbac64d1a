"""The record vocabulary's one filter for "the main overall number", and the storage layout's run files."""

import pytest
from platebench.harness.errors import HarnessError
from platebench.harness.results import layout, vocabulary
from platebench.harness.results.records import main_value, overall, records_table, validate
from platebench.harness.results.vocabulary import (
    HIGHER_IS_BETTER,
    METRICS,
    REPRESENTATION_METRICS,
    is_main_overall,
    main_overall,
)
from platebench.harness.train.runspec import RunSpec
from platebench.methods.base import TRACKS


def row(protocol="main", kind="all", domain="all", metric="accuracy", value=0.5, split="test", role="test"):
    return dict(run_id="r0", dataset="synth", dataset_checksum="abc", split_scheme="official", method="erm",
                track="standard", seed=0, hparams="{}", epoch=1, split=split, split_role=role, domain_kind=kind,
                domain=domain, eval_batch_size=0, n_controls=0, protocol=protocol, metric=metric, value=value, n=100,
                code="0.1.0+test")


# One row is the main overall accuracy; each other row differs from it in exactly one of the filter's fields.
ROWS = [
    row(value=0.7),
    row(protocol="batch-size-sweep", value=0.1),
    row(protocol="representation", metric="map_activity", value=0.2),
    row(kind="batch", domain="b1", value=0.3),
    row(kind="plate", domain="p1", value=0.4),
    row(metric="loss", value=2.0),
]


def test_only_the_main_overall_accuracy_passes_the_filter():
    validate(records_table(ROWS))  # every row is valid vocabulary
    assert [r["value"] for r in ROWS if is_main_overall(r)] == [0.7]
    assert [r["value"] for r in main_overall(ROWS)] == [0.7]
    assert [r["value"] for r in main_overall(ROWS, "loss")] == [2.0]
    assert overall(ROWS, split="test") == {1: 0.7}
    assert main_value(ROWS, "test") == 0.7 and main_value(ROWS, "test", "loss") == 2.0
    assert main_value(ROWS, "val") is None


def test_selected_rows_carry_no_metric_and_count_as_accuracies():
    selected = [{k: v for k, v in r.items() if k != "metric"} for r in ROWS if r["metric"] == "accuracy"]
    assert [r["value"] for r in selected if is_main_overall(r, metric=None)] == [0.7]


def test_vocabulary_is_defined_once():
    from platebench.harness.analysis import representation

    assert representation.METRICS == REPRESENTATION_METRICS
    assert set(HIGHER_IS_BETTER) == set(METRICS)
    assert vocabulary.TRACKS is TRACKS  # the methods layer's tracks, not a second list


def test_run_files_round_trip(tmp_path):
    storage = str(tmp_path)
    spec = RunSpec(data="file:///ds", dataset="synth", dataset_checksum="abc", split_scheme="official", method="erm",
                   hparams={"lr": 0.001}, backbone="resnet18", seed=0, code={"version": "0.1.0", "source": "x"})
    assert layout.read_done(storage, spec.run_id) is None and layout.finished_run_ids(storage) == []
    result = layout.write_run_done(storage, spec, {"selected_epoch": 2})
    assert result["skipped"] is False and result["selected_epoch"] == 2
    assert (tmp_path / "runs" / spec.run_id / "done.json").exists()
    assert RunSpec.from_dict(layout.read_run_json(storage, spec.run_id, layout.SPEC_FILE)) == spec
    done = layout.read_done(storage, spec.run_id)
    assert done["run_id"] == spec.run_id and done["selected_epoch"] == 2
    assert layout.finished_run_ids(storage) == [spec.run_id]
    assert layout.read_done_markers(storage, [spec.run_id, "other"]) == {spec.run_id: done}
    assert layout.read_run_file(storage, spec.run_id, layout.DONE_FILE) == \
        (tmp_path / "runs" / spec.run_id / "done.json").read_bytes()
    (tmp_path / "runs" / spec.run_id / "done.json").write_text("[1, 2]")
    with pytest.raises(HarnessError, match="done.json: expected a JSON object"):
        layout.read_done(storage, spec.run_id)


def test_storage_root_accepts_the_records_folder():
    assert layout.storage_root("s3://b/out/records/") == "s3://b/out"
    assert layout.storage_root("out") == "out" and layout.storage_root("records") == "."
    assert layout.epoch_records_file("out", "r", 3) == "out/records/r/epoch-00003.parquet"
    assert layout.epoch_records_file("out", "r", 3, "sweeps") == "out/records/r/epoch-00003.sweeps.parquet"

