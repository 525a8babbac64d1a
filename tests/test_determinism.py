"""A run's records are a function of its spec alone: the same run trained on a quiet machine and beside
CPU-hogging processes (read tasks finishing in another order, threads preempted) writes identical rows."""

import os
import subprocess
import sys

import pytest
from platebench.harness.cli import main
from platebench.harness.results.records import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = ["run_id", "epoch", "split", "domain_kind", "domain", "metric", "protocol", "eval_batch_size", "n_controls"]


@pytest.fixture(scope="module")
def parted_ds(tmp_path_factory):
    """Several parts per plate (4 rows each): many read tasks per epoch, whose completion order load changes."""
    from shard_fixtures import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("determinism") / "ds", images_per_plate=32, part_rows=4)


def _train(ds, out) -> None:
    # --cache-mb 0: every epoch streams its parts through Ray Data (nothing served from the part cache).
    assert main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", "erm", "--seeds", "0",
                 "--epochs", "1", "--hparams", "batch_size=8", "augment=flip", "--cache-mb", "0", "--no-mlflow",
                 "--out", str(out)]) == 0


def _rows(out):
    # Records carry no timings: every field must match, the values bit for bit.
    return read_records(str(out)).to_pandas().sort_values(KEY).reset_index(drop=True)


# Ray starts its worker processes at niceness 15: hogs at the default 0 would starve them (minutes per step)
# instead of sharing the cores with them, which is what a busy machine does.
RAY_WORKER_NICENESS = 15


def _hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS)) for _ in range(n)]


@pytest.mark.usefixtures("ray_session")
def test_records_are_identical_on_a_quiet_and_a_busy_machine(parted_ds, tmp_path):
    _train(parted_ds, tmp_path / "quiet")
    hogs = _hogs(2)  # one per core of the 2-core reference machine: every thread is preempted, yet all finish
    try:
        _train(parted_ds, tmp_path / "busy")
    finally:
        for proc in hogs:
            proc.kill()
            proc.wait()
    quiet, busy = _rows(tmp_path / "quiet"), _rows(tmp_path / "busy")
    assert len(quiet) > 0 and quiet[KEY].equals(busy[KEY])
    assert quiet.value.tolist() == busy.value.tolist()
    assert quiet.equals(busy)
