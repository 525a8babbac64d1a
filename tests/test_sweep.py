"""`platebench sweep`: Tune + Train trials, nested MLflow runs, resume after a killed driver, selection."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from platebench.harness.cli import main
from platebench.harness.results.records import write_epoch_records
from platebench.harness.train.runner import Launch
from platebench.harness.tune import space as tune_space
from platebench.harness.tune import sweep
from ray_procs import kill_ray_under
from shard_fixtures import build_tiny_dataset


def _sweep_args(ds, out, *extra):
    return ["sweep", "--data", ds, "--split-scheme", "new_batches", "--method", "abra", "--trials", "3",
            "--epochs", "1", "--hparams", "batch_size=8", "warmup_epochs=0", "--max-concurrent", "1", "--out", str(out),
            *extra]


def _done_runs(out) -> list[Path]:
    return list(Path(out).glob("sweeps/*/runs/*/done.json"))


@pytest.mark.slow  # two sweeps, one of them in a subprocess with its own Ray
@pytest.mark.usefixtures("ray_session")
def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    ds = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="pbr", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PLATEBENCH_RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "platebench.harness.cli", *_sweep_args(ds, out)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(_done_runs(out)) < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        assert len(_done_runs(out)) >= 1, "the first trial never finished"
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without any cleanup
        proc.wait()
        kill_ray_under(ray_tmp)

    assert main(_sweep_args(ds, out, "--resume", "--final-seeds", "0", "1")) == 0
    best = json.loads((out / "best_config.json").read_text())
    assert {"method", "hparams", "metric", "value", "selection_split"} <= set(best)
    assert best["method"] == "abra" and best["selection_split"] == "val" and 0 <= best["value"] <= 1
    assert {"step_size", "arcface_margin", "js_weight"} <= set(best["hparams"])

    done = _done_runs(out)
    assert len(done) == 3  # three trials, each trained to completion exactly once
    trial_dirs = [p for p in next((out / "tune").iterdir()).iterdir() if p.is_dir()]
    assert len(trial_dirs) == 3
    for d in done:
        run_id = d.parent.name
        files = sorted(p.name for p in (d.parents[2] / "records" / run_id).iterdir())
        assert files == ["epoch-00001.parquet", "epoch-00001.representation.parquet", "epoch-00001.tests.parquet"]

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("platebench.kind") == "parent"]
    trials = [r for r in runs if r.data.tags.get("platebench.kind") == "trial"]
    assert len(parents) == 1  # the resumed driver continued the same sweep run
    assert len({r.data.tags["platebench.run_id"] for r in trials}) == 3
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"step_size", "arcface_margin", "js_weight"} <= set(r.data.params)
    assert json.loads((out / "best_configs.json").read_text())["abra"]["trials"] == 3

    # sweep -> final seeds -> leaderboard on one storage root: the table names the selected config and its trials
    assert main(["leaderboard", "--records", str(out), "--baseline", "abra", "--out", str(out / "board")]) == 0
    board = json.loads((out / "board" / "leaderboard.json").read_text())
    row = next(r for t in board["tables"] if t["split"] == "test" for r in t["rows"] if r["method"] == "abra")
    assert row["hparams"] == best["hparams"] and row["trials"] == 3 and row["n"] == 2


def test_selection_reads_validation_only(tmp_path):
    ds = build_tiny_dataset(tmp_path / "ds")
    space = tune_space.for_method("erm")
    cfg = sweep.SweepConfig(data=ds, split_scheme="new_batches", method="erm", space=space, trials=2,
                            fixed_hparams={"epochs": 2, "batch_size": 8})
    launch = Launch(storage=str(tmp_path / "store"))
    experiment = "exp"
    trials = []
    # Trial A wins on validation, trial B on every test split: selection must pick A.
    for name, val, test in (("A", [0.5, 0.7], [0.2, 0.1]), ("B", [0.4, 0.6], [0.9, 0.95])):
        spec = sweep.trial_spec(cfg, {"lr": 0.001 if name == "A" else 0.002, "weight_decay": 1e-5})
        trials.append({"run_id": spec.run_id, "hparams": spec.hparams})
        for epoch in (1, 2):
            rows = []
            for split, role, value in (("val", "val", val[epoch - 1]), ("test", "test", test[epoch - 1]),
                                       ("id_test", "test", test[epoch - 1])):
                rows.append({"run_id": spec.run_id, "dataset": "tiny", "dataset_checksum": spec.dataset_checksum,
                             "split_scheme": "new_batches", "method": "erm", "track": "standard", "seed": spec.seed,
                             "hparams": spec.hparams_json, "epoch": epoch, "split": split, "split_role": role,
                             "domain_kind": "all", "domain": "all", "eval_batch_size": 64, "n_controls": 0,
                             "protocol": "main", "metric": "accuracy", "value": value, "n": 10,
                             "code": spec.code_label})
            write_epoch_records(sweep.trial_storage(launch, experiment), spec.run_id, epoch, rows)
    best = sweep.select_best(cfg, launch, experiment, trials)
    assert best["run_id"] == trials[0]["run_id"] and best["value"] == 0.7 and best["epoch"] == 2
    assert best["selection_split"] == "val"
