"""`platebench validate`: suites, search spaces, best-configs files and records folders, one line per problem."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from platebench.harness.cli import main
from shard_fixtures import build_tiny_dataset


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_session):
    """A storage root with one finished 3-epoch ERM run."""
    root = tmp_path_factory.mktemp("validate")
    ds = build_tiny_dataset(root / "ds", images_per_plate=32)
    assert main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", "erm", "--seeds", "0",
                 "--epochs", "3", "--hparams", "batch_size=8", "--out", str(root / "out"), "--no-mlflow"]) == 0
    return root / "out"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("trainings", "ray"))
    return dst


def test_a_finished_run_validates(finished, capsys):
    assert main(["validate", str(finished)]) == 0
    assert "records OK (1 runs)" in capsys.readouterr().out


def test_a_claimed_selection_that_the_records_do_not_support_is_named(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "out")
    (done_path,) = out.glob("runs/*/done.json")
    done = json.loads(done_path.read_text())
    done["selected_epoch"] = 3 if done["selected_epoch"] != 3 else 1
    done_path.write_text(json.dumps(done))
    assert main(["validate", str(out), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"run {done['run_id']}: field 'selected_epoch': done.json claims epoch {done['selected_epoch']}" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report[str(out)]["kind"] == "records" and len(report[str(out)]["problems"]) == 1


def test_missing_test_records_missing_done_markers_and_duplicates_are_named(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "out")
    (run_dir,) = (out / "records").iterdir()
    for f in run_dir.glob("*.tests.parquet"):
        f.unlink()
    assert main(["validate", str(out)]) == 2
    assert "field 'split': no test-split records at selectable epoch(s)" in capsys.readouterr().err
    out2 = _copy(finished, tmp_path / "out2")
    (run_dir,) = (out2 / "records").iterdir()
    twin = out2 / "records" / "erm-s0-000000000000"  # the same run's numbers filed under another id
    twin.mkdir()
    for f in run_dir.glob("*.parquet"):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("run_id"), "run_id", pa.array(["erm-s0-000000000000"] * len(t)))
        pq.write_table(t, twin / f.name)
    assert main(["validate", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "erm-s0-000000000000: no done marker" in err
    assert "same dataset, scheme, method, hparams, seed and code as run" in err


def test_a_spec_that_does_not_hash_to_its_run_id_is_named(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "out")
    (spec_path,) = out.glob("runs/*/spec.json")
    run = spec_path.parent.name
    spec = json.loads(spec_path.read_text())
    spec["seed"] = 5
    spec_path.write_text(json.dumps(spec))
    assert main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run {run}: field 'seed': spec.json hashes to run id erm-s5-" in err and f"not {run}" in err
    assert "done.json 'spec'" not in err  # the marker's copy is still the run's
    # records filed under the run but carrying another run id
    out2 = _copy(finished, tmp_path / "out2")
    (epoch_file,) = out2.glob(f"records/{run}/epoch-00001.parquet")
    t = pq.read_table(epoch_file)
    pq.write_table(t.set_column(t.schema.get_field_index("run_id"), "run_id", pa.array(["erm-s0-0123456789ab"] * len(
        t))), epoch_file)
    assert main(["validate", str(out2)]) == 2
    assert f"run {run}: field 'run_id': records/{run}/ holds records of run(s) erm-s0-0123456789ab" in (
        capsys.readouterr().err)


def test_configuration_files_are_checked_by_the_commands_own_readers(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: x\ndataset: {preset: tiny}\nsplit_scheme: new_batches\nmethods: [erm]\nseeds: [a]\n")
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"abra": {"hparams": {}, "trials": 0}}))
    space = tmp_path / "space.yaml"
    space.write_text("method: erm\nparams:\n  lr: {distribution: uniform, low: -1, high: 1, default: 0.001}\n")
    assert main(["validate", str(suite), str(best), str(space)]) == 2
    err = capsys.readouterr().err
    assert "seeds[0] must be an integer >= 0, got 'a'" in err
    assert "method 'abra': 'trials' must be a positive integer, got 0" in err
    assert "params.lr: -1.0 is not a valid value of 'erm''s lr" in err
    assert main(["validate", "harness/suites/quickstart.yaml", "tune_spaces/abra.yaml"]) == 0
