"""`platebench run` on Ray Train: records, idempotence, resume, worker failure, errors before training."""

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
from platebench.harness.cli import main
from platebench.harness.results.records import read_records


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    from shard_fixtures import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("runs") / "ds", images_per_plate=32)


def _run(ds, out, *extra, method="erm", epochs=2):
    return main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", method, "--seeds", "0",
                 "--epochs", str(epochs), "--hparams", "batch_size=8", "--out", str(out), *extra])


def _record_files(out) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in Path(out, "records").rglob("*.parquet")}


def _assert_complete(out, epochs):
    """Validation at every epoch; the test splits exactly at the epochs a selection rule can choose (the best
    validation accuracy and the lowest validation loss, the earliest of ties, and the last); no duplicates."""
    import json

    t = read_records(str(out)).to_pandas()
    main_rows = t[t.protocol == "main"]
    key = ["run_id", "epoch", "split", "domain_kind", "domain", "metric", "protocol", "eval_batch_size", "n_controls"]
    assert not main_rows.duplicated(key).any()
    assert set(main_rows.domain_kind) == {"all", "plate", "batch", "source", "cell_type"}
    overall = main_rows[(main_rows.domain_kind == "all") & (main_rows.metric == "accuracy")]
    assert overall.value.between(0, 1).all()
    for run_id, rows in overall.groupby("run_id"):
        val = rows[rows.split == "val"].set_index("epoch").value
        assert sorted(val.index) == list(range(1, epochs + 1))
        best = int(val[val == val.max()].index.min())
        losses = main_rows[(main_rows.run_id == run_id) & (main_rows.split == "val") & (main_rows.metric == "loss")
                           & (main_rows.domain_kind == "all")].set_index("epoch").value
        lowest = int(losses[losses == losses.min()].index.min())
        for split in ("id_test", "test"):
            assert set(rows[rows.split == split].epoch) == {best, lowest, epochs}
        done = json.loads(Path(out, "runs", run_id, "done.json").read_text())
        assert done["selected_epoch"] == best and set(done["selectable_epochs"]) == {best, lowest, epochs}
    return t


@pytest.mark.usefixtures("ray_session")
def test_run_writes_complete_records_and_mlflow_and_is_never_trained_twice(small_ds, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(small_ds, out) == 0
    t = _assert_complete(out, 2)
    run_id = t.run_id.iloc[0]
    assert (out / "runs" / run_id / "done.json").exists()
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("platebench.kind") == "parent"]
    training = [r for r in runs if r.data.tags.get("platebench.kind") == "training"]
    child = [r for r in runs if r.data.tags.get("platebench.run_id") == run_id]
    assert len(parent) == 1 and len(training) == 1 and len(child) == 1
    assert child[0].data.tags["mlflow.parentRunId"] == training[0].info.run_id
    assert training[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert "train/loss" in training[0].data.metrics
    assert {"lr", "epochs", "dataset_checksum", "code", "seed", "training_id"} <= set(child[0].data.params)
    assert "test/accuracy" in child[0].data.metrics and "val/accuracy/batch:b2" in child[0].data.metrics
    assert {a.path for a in client.list_artifacts(child[0].info.run_id)} >= {"config.json", "selected.json"}

    before = _record_files(out)
    capsys.readouterr()
    assert _run(small_ds, out) == 0
    assert "(already done)" in capsys.readouterr().out
    assert _record_files(out) == before  # nothing retrained, nothing rewritten


@pytest.fixture(scope="module")
def interrupted(small_ds, ray_session, tmp_path_factory):
    """A 3-epoch run stopped by a fault injected at the start of epoch 2, no retries: (its storage, exit code,
    stderr). Trained once; each test resumes its own copy."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = _run(small_ds, out, "--inject-fault", "epoch=2,step=0,rank=0,mode=raise", "--max-failures", "0",
                  "--no-mlflow", epochs=3)
    return out, rc, err.getvalue()


def _copy_of(interrupted, tmp_path) -> Path:
    return Path(shutil.copytree(interrupted[0], tmp_path / "out"))


@pytest.mark.usefixtures("ray_session")
def test_interrupted_run_continues_from_its_checkpoint(small_ds, interrupted, tmp_path):
    _, rc, err = interrupted
    assert rc == 2 and "INJECTED FAULT" in err
    out = _copy_of(interrupted, tmp_path)
    first = _record_files(out)
    assert list(first) == ["epoch-00001.parquet"]
    assert not list(Path(out, "runs").glob("*/done.json"))
    assert _run(small_ds, out, "--no-mlflow", epochs=3) == 0  # the same command again
    after = _record_files(out)
    assert after["epoch-00001.parquet"] == first["epoch-00001.parquet"]  # epoch 1 was not trained again
    _assert_complete(out, 3)


@pytest.mark.usefixtures("ray_session")
def test_worker_killed_mid_epoch_resumes_and_records_have_no_gaps_or_duplicates(small_ds, tmp_path):
    out = tmp_path / "out"
    assert _run(small_ds, out, "--inject-fault", "epoch=2,step=1,rank=0,mode=exit", "--max-failures", "2",
                "--no-mlflow", epochs=3) == 0
    assert any(Path(out, "faults").iterdir())  # the worker really died once
    _assert_complete(out, 3)


@pytest.mark.parametrize("argv,message", [
    (["--method", "ermm"], "unknown method 'ermm'. Did you mean 'erm'?"),
    (["--method", "erm", "--hparams", "learning_rate=0.1"], "unknown hyperparameter 'learning_rate'"),
    (["--method", "erm", "--hparams", "lr=fast"], "hyperparameter 'lr' needs a float, got 'fast'"),
    (["--method", "erm", "--split-scheme", "new_lab"], "split scheme 'new_lab' is not in the manifest"),
    (["--method", "erm", "--hparams", "batch_size=64"], "gives no batch of batch_size=64 with 1 worker(s)"),
])
def test_bad_input_fails_before_training(small_ds, tmp_path, capsys, argv, message):
    base = ["run", "--data", small_ds, "--split-scheme", "new_batches", "--out", str(tmp_path), "--no-mlflow"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow  # the MLflow client
def test_unreachable_mlflow_server_fails_before_training(small_ds, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["run", "--data", small_ds, "--split-scheme", "new_batches", "--method", "erm", "--out", str(tmp_path),
               "--hparams", "batch_size=8", "--mlflow-uri", f"http://127.0.0.1:{port}"])
    assert rc == 2 and "MLflow tracking server http://127.0.0.1" in capsys.readouterr().err


def test_storage_without_write_permission_fails_before_training(small_ds, tmp_path, capsys, s3_server, monkeypatch):
    s3_server.create_bucket("pb-readonly")
    monkeypatch.setenv("PLATEBENCH_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("PLATEBENCH_S3_ANON", "1")
    rc = main(["run", "--data", small_ds, "--split-scheme", "new_batches", "--method", "erm", "--out", str(tmp_path),
               "--hparams", "batch_size=8", "--no-mlflow", "--storage", "s3://pb-readonly/runs"])
    err = capsys.readouterr().err
    assert rc == 2 and "storage s3://pb-readonly/runs is not writable" in err
    assert not os.path.exists(tmp_path / "records")


class _Payload:
    """Pickled, this would create `path` when unpickled: what an attacker plants in a shared bucket."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.usefixtures("ray_session")
def test_resume_refuses_a_checkpoint_that_is_not_tensors_only(small_ds, interrupted, tmp_path, capsys):
    import pickle

    assert interrupted[1] == 2
    out = _copy_of(interrupted, tmp_path)
    (state,) = Path(out, "trainings").glob("*/state.pt")
    marker = tmp_path / "executed"
    state.write_bytes(pickle.dumps({"method": _Payload(str(marker)), "train": {}}))
    capsys.readouterr()
    assert _run(small_ds, out, "--no-mlflow", epochs=3) == 2
    err = capsys.readouterr().err
    assert "state.pt: not a tensors-only checkpoint, refusing to load it" in err
    assert not marker.exists()  # nothing from storage was executed
    assert not list(Path(out, "runs").glob("*/done.json"))


@pytest.mark.usefixtures("ray_session")
def test_a_diverged_training_stops_there_and_the_leaderboard_names_it(small_ds, tmp_path):
    import json

    out = tmp_path / "out"
    # Adam at lr 1e30: the loss is NaN from the second step on.
    assert main(["run", "--data", small_ds, "--split-scheme", "new_batches", "--method", "erm", "--seeds", "0",
                 "--epochs", "3", "--hparams", "batch_size=8", "lr=1e30", "--no-mlflow", "--out", str(out)]) == 0
    done = json.loads(next(Path(out, "runs").glob("*/done.json")).read_text())
    assert done["diverged_epoch"] == 1 and done["timings"]["trained_epochs"] == 1  # epochs 2-3 never trained
    t = read_records(str(out)).to_pandas()
    overall = t[(t.domain_kind == "all") & (t.split == "val")].set_index("metric").value
    assert set(t.epoch) == {1} and overall.isna()["loss"] and 0 <= overall["accuracy"] <= 1
    assert main(["leaderboard", "--records", str(out), "--out", str(tmp_path / "board")]) == 0
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    assert f"erm seed 0 (run {done['run_id']}): diverged at epoch 1" in text
