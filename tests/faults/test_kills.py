"""Kills: a Ray Data read worker killed in the middle of its run of parts (every part still arrives once, whole, in
order), a Train worker killed during a run's evaluations after training (test splits, TTA sweeps, representation
analysis) and the `bench` driver killed mid-run (SIGKILL, no clean-up), then the same command again. Those end
with every record present once, nothing trained twice, and the same records and leaderboard numbers as an
uninterrupted bench of the same suite (CPU, same seeds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from platebench.harness.cli import main
from platebench.harness.results.records import read_records

pytestmark = [pytest.mark.faults, pytest.mark.ray]

KEY = ["run_id", "epoch", "split", "domain_kind", "domain", "metric", "protocol", "eval_batch_size", "n_controls"]
EVALUATION_FILES = ("*.tests.parquet", "*.sweeps.parquet", "*.representation.parquet")


@pytest.fixture(scope="module")
def kill_ds(tmp_path_factory):
    from shard_fixtures import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("kills") / "ds", images_per_plate=32)


def _bench(ds, out, *extra) -> list[str]:
    # ERM and AdaBN share one training; AdaBN is a TTA method, so its run has the sweeps phase.
    return ["bench", "--data", ds, "--methods", "erm", "adabn", "--baseline", "erm", "--seeds", "0",
            "--epochs", "3", "--hparams", "batch_size=8", "--no-mlflow", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(kill_ds, ray_session, tmp_path_factory):
    """The uninterrupted bench: its storage root."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(_bench(kill_ds, out)) == 0
    return out


def _rows(out):
    return read_records(str(out)).to_pandas().sort_values(KEY).reset_index(drop=True)


def _record_files(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in Path(out, "records").rglob("*.parquet")}


def _tables(out) -> list[dict]:
    """The leaderboard's tables: every number and star the reader sees."""
    return json.loads(Path(out, "leaderboard.json").read_text())["tables"]


def _assert_same_results(out, reference) -> None:
    got, want = _rows(out), _rows(reference)
    assert not got.duplicated(KEY).any()  # every record once
    assert got.equals(want)  # the same rows, the values bit for bit
    assert _tables(out) == _tables(reference)
    assert not [p for p in Path(out).rglob("*") if ".tmp" in p.name]  # no half-written file left behind


@pytest.mark.parametrize("phase", ["sweeps", "representation"])
def test_worker_killed_during_a_post_training_phase_redoes_that_phase_only(kill_ds, reference, tmp_path, phase):
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    # The training is done; its runs' evaluations after training and done markers are not (as if the
    # worker had died there the first time).
    for pattern in EVALUATION_FILES:
        for f in Path(out, "records").rglob(pattern):
            f.unlink()
    for f in Path(out, "runs").glob("*/done.json"):
        f.unlink()
    validation = _record_files(out)
    assert main(_bench(kill_ds, out, "--inject-fault", f"phase={phase},mode=exit", "--max-failures", "2")) == 0
    assert [p.name for p in Path(out, "faults").iterdir()][0].endswith(f"-{phase}-r0")  # the worker really died
    after = _record_files(out)
    assert {k: after[k] for k in validation} == validation  # no epoch trained or validated again
    _assert_same_results(out, reference)


@pytest.mark.slow  # a bench in a subprocess with its own Ray
def test_bench_driver_killed_then_the_same_command_gives_the_same_leaderboard(kill_ds, reference, tmp_path):
    from ray_procs import kill_ray_under

    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="pbk", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PLATEBENCH_RAY_TMPDIR": ray_tmp}
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "platebench.harness.cli", *_bench(kill_ds, out)], env=env,
                            start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        # Killed once epoch 2 is validated: epoch 1's resume state is saved by then, epoch 2's may not be.
        deadline = time.time() + 300
        while not list(out.glob("records/*/epoch-00002.parquet")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(out.glob("records/*/epoch-00002.parquet")), \
            f"the bench never finished epoch 2 (driver exit code {proc.poll()}): {log.read_text()[-3000:]}"
        assert proc.poll() is None, f"the bench ended before it could be killed: {log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the driver alone dies, without any clean-up
        proc.wait()
        kill_ray_under(ray_tmp)
    assert not list(Path(out, "runs").glob("*/done.json"))
    first_epoch = {k: v for k, v in _record_files(out).items() if k.endswith("epoch-00001.parquet")}
    assert first_epoch
    assert main(_bench(kill_ds, out)) == 0  # the same command again (its dead driver's lock is taken over)
    after = _record_files(out)
    assert {k: after[k] for k in first_epoch} == first_epoch  # epoch 1 was not trained or validated again
    _assert_same_results(out, reference)


@pytest.mark.usefixtures("ray_session")
def test_read_worker_killed_mid_task_rereads_and_every_part_arrives_once_whole_in_order(tmp_path):
    # A read task reads a run of parts and hands each on as it is read: killed after its first part was delivered,
    # Ray re-runs the task, and the stream must still get each part exactly once, whole, in plan order.
    import psutil
    from platebench.datasets.shards import open_dataset
    from platebench.harness.data.stream import PlateStream, StreamConfig
    from platebench.methods.base import BatchShape
    from shard_fixtures import build_tiny_dataset

    ds = open_dataset(build_tiny_dataset(tmp_path / "ds", images_per_plate=128, part_rows=8, size=64))
    # one read slot: a single task reads all the parts, so it is still running when the first part arrives
    stream = PlateStream(ds, StreamConfig("new_batches", None, BatchShape(4), train=False, read_concurrency=1))
    parts = list(ds.manifest.parts)
    got, killed = [], []
    for block in stream.read_parts(parts):
        got.append(block)
        if len(got) == 1:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "ray::ReadPlateShards" in (proc.info["cmdline"] or [""])[0]:
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
    assert len(killed) == 1  # the read task was running, mid-run, when it was killed
    assert len(got) == len(parts) == 96
    assert all(block.equals(ds.read_part(part)) for block, part in zip(got, parts))
