"""`platebench validate --reproduce`: runs re-run from their specs must write the numbers they recorded.

The comparison, the choice of runs and the refusals are checked without Ray; one real AdaBN run (it trains as ERM:
the reproduction must train its parent's training) is exported once for the module and re-run.
"""

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from platebench.datasets.shards import open_dataset
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.results.layout import write_run_done
from platebench.harness.results.records import records_table
from platebench.harness.train import reproduce
from platebench.harness.train.runspec import build_specs
from shard_fixtures import build_tiny_dataset


def _row(split: str, metric: str, value: float, n: int = 16) -> dict:
    return {"run_id": "erm-s0-abc", "dataset": "tiny", "dataset_checksum": "c", "split_scheme": "new_batches",
            "method": "erm", "track": "standard", "seed": 0, "hparams": "{}", "epoch": 1, "split": split,
            "split_role": "test", "domain_kind": "all", "domain": "all", "eval_batch_size": 64, "n_controls": 0,
            "protocol": "main", "metric": metric, "value": value, "n": n, "code": "0.1+x"}


def test_records_must_agree_bit_for_bit_or_the_first_difference_is_named():
    rows = [_row("id_test", "accuracy", 0.5), _row("id_test", "loss", 1.25), _row("test", "accuracy", 0.375)]
    recorded = records_table(rows)
    assert reproduce.compare_tables(recorded, records_table(list(reversed(rows)))) is None  # order is not a number
    moved = [dict(r) for r in rows]
    moved[1]["value"] = math.nextafter(1.25, 2.0)  # one unit in the last place
    assert reproduce.compare_tables(recorded, records_table(moved)) == (
        f"row 1 (epoch 1 split 'id_test' all=all main batch 64 controls 0 loss): column 'value' recorded 1.25, "
        f"reproduced {math.nextafter(1.25, 2.0)!r}")
    assert reproduce.compare_tables(recorded, records_table(moved), tolerance=reproduce.GPU_TOLERANCE) is None
    recounted = [dict(r) for r in rows]
    recounted[2]["n"] = 15
    assert "row 2 (epoch 1 split 'test'" in reproduce.compare_tables(recorded, records_table(recounted))
    assert "column 'n' recorded 16, reproduced 15" in reproduce.compare_tables(recorded, records_table(recounted),
                                                                               tolerance=1.0)
    assert reproduce.compare_tables(recorded, records_table(rows[:2])).startswith("row 2 (epoch 1 split 'test'")
    assert reproduce.compare_tables(records_table(rows[:2]), recorded) == (
        "a row not recorded was reproduced (epoch 1 split 'test' all=all main batch 64 controls 0 accuracy)")


def test_the_choice_of_runs_is_a_function_of_the_seed():
    ids = [f"erm-s{k}-{k:012x}" for k in range(10)]
    picked = reproduce.choose(list(reversed(ids)), 3, seed=7)
    assert picked == reproduce.choose(ids, 3, seed=7) == sorted(picked) and set(picked) <= set(ids)
    assert len({tuple(reproduce.choose(ids, 3, seed=s)) for s in range(20)}) > 1  # the seed does draw
    assert reproduce.choose(ids, None, seed=0) == reproduce.choose(ids, 50, seed=0) == ids


@pytest.fixture(scope="module")
def adabn_root(tmp_path_factory):
    """A storage root holding one finished AdaBN run's spec and done marker (no records: plan() reads none), whose
    training was shared with an ERM run that is not there."""
    root = tmp_path_factory.mktemp("plan")
    ds = build_tiny_dataset(root / "ds", images_per_plate=32)
    (spec,) = build_specs(open_dataset(ds), "new_batches", "adabn", {"batch_size": 8, "epochs": 1}, [0], "resnet-tiny")
    write_run_done(str(root / "out"), spec, {"training_id": spec.training().training_id,
                                             "shared_with": ["erm", "adabn"],
                                             "resources": {"workers": 1, "device": "cpu (x86_64)"}})
    return root / "out", ds, spec


def test_a_variant_is_re_run_with_the_runs_it_shared_its_training_with(adabn_root):
    out, ds, spec = adabn_root
    p = reproduce.plan(str(out), ds, 1, seed=0)
    assert p.chosen == p.compared == [spec.run_id] and p.tolerance == {spec.run_id: 0.0}
    ((workers, job),) = p.jobs
    # The original job's order and members: ERM (rebuilt from AdaBN's training hyperparameters) then AdaBN, one
    # training between them.
    assert workers == 1 and [s.method for s in job] == ["erm", "adabn"] and job[1] == spec
    assert job[0].training() == spec.training() and p.rebuilt == [f"erm (for run {spec.run_id})"]


def test_reproduction_is_refused_without_the_runs_dataset_or_code(adabn_root, tmp_path, monkeypatch):
    out, ds, spec = adabn_root
    with pytest.raises(HarnessError, match=r"--reproduce needs --data: the root of the dataset the runs trained on "
                                           r"\(tiny \(checksum "):
        reproduce.plan(str(out), None, 1, seed=0)
    other = build_tiny_dataset(tmp_path / "other", images_per_plate=32, seed=1)  # same name, other pixels
    with pytest.raises(HarnessError, match=r"dataset 'tiny' with checksum .* is not the dataset of any run"):
        reproduce.plan(str(out), other, 1, seed=0)
    monkeypatch.setattr(reproduce, "code_identity", lambda cls: {"version": "9.9.9", "source": "0" * 16})
    label = f"{spec.code['version']}+{spec.code['source']}"
    with pytest.raises(HarnessError, match=re.escape(f"run {spec.run_id}: made by code {label}, this installation "
                                                     "is 9.9.9+0000000000000000")):
        reproduce.plan(str(out), ds, 1, seed=0)


# -- one real run, exported and re-run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("reproduce")
    ds = build_tiny_dataset(root / "ds", images_per_plate=32)
    assert main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", "adabn", "--seeds", "0",
                 "--epochs", "1", "--hparams", "batch_size=8", "--out", str(root / "out"), "--no-mlflow"]) == 0
    assert main(["export", "--records", str(root / "out"), "--out", str(root / "bundle")]) == 0
    (run_id,) = [p.name for p in (root / "bundle" / "runs").iterdir()]
    return root / "bundle", ds, run_id


def _rehash(bundle: Path) -> None:
    """What a tamperer does after editing a bundle: list the edited files' new sha256 in bundle.json."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"] = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in bundle.rglob("*") if p.is_file() and p.name != "bundle.json"}
    (bundle / "bundle.json").write_text(json.dumps(meta))


def test_a_bundle_re_run_from_its_specs_gives_its_numbers(bundle, capsys):
    path, ds, run_id = bundle
    assert main(["validate", str(path), "--reproduce", "1", "--data", ds]) == 0
    out = capsys.readouterr().out
    assert f"reproducing 1 of 1 run(s) (chosen with --seed 0): {run_id}" in out
    assert "rebuilt" not in out  # the run trained alone: its job was AdaBN only, on ERM's training
    assert f"run {run_id}: reproduced, " in out and "the same bit for bit" in out


def test_a_number_edited_and_rehashed_is_named_by_the_reproduction(bundle, tmp_path, capsys):
    path, ds, run_id = bundle
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    victim = edited / "records" / run_id / "epoch-00001.tests.parquet"
    t = pq.read_table(victim)
    values = t.column("value").to_pylist()
    recorded, values[0] = values[0], values[0] + 0.125
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value", pa.array(values, pa.float64())), victim)
    _rehash(edited)
    assert main(["validate", str(edited)]) == 0  # every check a tamperer can pass
    capsys.readouterr()
    assert main(["validate", str(edited), "--reproduce", "all", "--data", ds]) == 2
    err = capsys.readouterr().err
    assert (f"{edited}: run {run_id}: file records/{run_id}/epoch-00001.tests.parquet: row 0 (epoch 1 split "
            in err)
    assert f"column 'value' recorded {values[0]!r}, reproduced {recorded!r}" in err


def test_another_code_identity_is_refused_in_one_line(bundle, monkeypatch, capsys):
    path, ds, run_id = bundle
    monkeypatch.setattr(reproduce, "code_identity", lambda cls: {"version": "9.9.9", "source": "0" * 16})
    assert main(["validate", str(path), "--reproduce", "all", "--data", ds]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"run {run_id}: made by code " in err and "this installation is 9.9.9+0000000000000000" in err
