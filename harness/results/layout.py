"""The storage layout: where every file of a benchmark lives under a storage root, and the one reader and
writer of each run's files.

    <storage>/
      records/<run_id>/epoch-NNNNN[.<kind>].parquet  the run's records (harness/results/records.py)
      runs/<run_id>/spec.json                        the run's spec
      runs/<run_id>/done.json                        its done marker: written last, so its presence means every
                                                     record of the run is written
      runs/<run_id>/<other>.json                     placement, MLflow gaps, ...
      trainings/<training_id>/                       a training's checkpoints (harness/train/checkpointing.py)
      sweeps/<experiment>/                           a sweep's trials, laid out like a storage root of their own
      tune/<experiment>/                             Ray Tune's own experiment folder
      ray/lanes/                                     Ray Train's own run folders
      bundle.json                                    only in an exported bundle (harness/results/bundle.py)
      lock.json                                      the command writing here now (harness/train/storage_lock.py,
                                                     which reads and writes it)

A storage root may be named by its records/ folder too (`storage_root`). Paths are built with
`platebench.datasets.storage.join`, so they work on URLs (file://, s3://) and on filesystem paths alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from platebench.datasets.storage import StorageOptions, filesystem, join, put_atomic, with_retries

from ..errors import HarnessError

if TYPE_CHECKING:
    from ..train.runspec import RunSpec

RECORDS_DIR = "records"
RUNS_DIR = "runs"
TRAININGS_DIR = "trainings"
SWEEPS_DIR = "sweeps"
TUNE_DIR = "tune"
RAY_DIR = "ray"
DONE_FILE = "done.json"
SPEC_FILE = "spec.json"
BUNDLE_FILE = "bundle.json"
LOCK_FILE = "lock.json"
EPOCH_FILES = "epoch-*.parquet"  # every records file of a run
MAIN_EPOCH_FILES = "epoch-?????.parquet"  # the per-epoch evaluations only (no sweeps, no representation)


# -- paths ------------------------------------------------------------------------------------------
def storage_root(url: str) -> str:
    """The storage root of `url`, which may name the root or its records/ folder."""
    root = url.rstrip("/")
    if root.endswith("/" + RECORDS_DIR) or root == RECORDS_DIR:
        root = root[: -len(RECORDS_DIR)].rstrip("/") or "."
    return root


def records_dir(storage: str, run_id: str | None = None) -> str:
    """records/, or one run's folder in it."""
    return join(storage, RECORDS_DIR) if run_id is None else join(storage, RECORDS_DIR, run_id)


def epoch_records_file(storage: str, run_id: str, epoch: int, kind: str = "main") -> str:
    """The records of one evaluation: `kind` "main" is the per-epoch one, any other kind gets its own suffix."""
    suffix = "" if kind == "main" else f".{kind}"
    return join(records_dir(storage, run_id), f"epoch-{epoch:05d}{suffix}.parquet")


def runs_dir(storage: str) -> str:
    return join(storage, RUNS_DIR)


def run_dir(storage: str, run_id: str) -> str:
    return join(storage, RUNS_DIR, run_id)


def run_file(storage: str, run_id: str, name: str) -> str:
    """A file of one run, e.g. `run_file(storage, run_id, DONE_FILE)`."""
    return join(storage, RUNS_DIR, run_id, name)


def training_dir(storage: str, training_id: str) -> str:
    return join(storage, TRAININGS_DIR, training_id)


def sweep_dir(storage: str, experiment: str) -> str:
    return join(storage, SWEEPS_DIR, experiment)


def tune_dir(storage: str) -> str:
    """Where Ray Tune keeps its experiments."""
    return join(storage, TUNE_DIR)


def lock_file(storage: str) -> str:
    """The storage lock: which command is writing trainings and records under `storage`."""
    return join(storage, LOCK_FILE)


def lanes_dir(storage: str) -> str:
    """Where Ray Train keeps the run folders of the training lanes."""
    return join(storage, RAY_DIR, "lanes")


# -- reading ----------------------------------------------------------------------------------------
def read_json(url: str, options: StorageOptions | None = None, required: bool = True):
    """A JSON file (None when absent and not required); bad JSON is one line naming the file."""
    fs, path = filesystem(url, options)
    data = with_retries(lambda: fs.cat_file(path) if required or fs.exists(path) else None, f"reading {url}")
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise HarnessError(f"{url}: not valid JSON ({exc})") from None


def read_run_file(storage: str, run_id: str, name: str, options: StorageOptions | None = None) -> bytes | None:
    """A run file's bytes, unparsed (None when absent): bundles copy them byte for byte."""
    url = run_file(storage, run_id, name)
    fs, path = filesystem(url, options)
    return with_retries(lambda: fs.cat_file(path) if fs.exists(path) else None, f"reading {url}")


def read_run_json(storage: str, run_id: str, name: str, options: StorageOptions | None = None) -> dict | None:
    """A run file holding a JSON object (None when absent); bad JSON or another value is one line naming it."""
    data = read_json(run_file(storage, run_id, name), options, required=False)
    if data is not None and not isinstance(data, dict):
        raise HarnessError(f"{run_file(storage, run_id, name)}: expected a JSON object")
    return data


def read_done(storage: str, run_id: str, options: StorageOptions | None = None) -> dict | None:
    """The run's done marker, None while the run is not finished."""
    return read_run_json(storage, run_id, DONE_FILE, options)


def finished_run_ids(storage: str, options: StorageOptions | None = None) -> list[str]:
    """The ids of the runs under `storage` that have a done marker, sorted."""
    fs, base = filesystem(storage, options)
    found = with_retries(lambda: fs.glob(join(base, RUNS_DIR, "*", DONE_FILE)), f"listing {runs_dir(storage)}")
    return sorted(path.rstrip("/").split("/")[-2] for path in found)


def finished_run_id(storage: str, prefix: str, options: StorageOptions | None = None) -> str:
    """The finished run whose id is `prefix` or starts with it (exactly one), e.g. "erm-s0" (`--run`)."""
    ids = finished_run_ids(storage, options)
    if prefix in ids:
        return prefix
    matches = [i for i in ids if i.startswith(prefix)]
    if len(matches) != 1:
        raise HarnessError(f"--run {prefix!r}: {'no finished run' if not matches else f'{len(matches)} runs'} under "
                           f"{storage} match{'es' if len(matches) == 1 else ''} it"
                           + (f" ({', '.join(matches[:5])})" if matches else ""))
    return matches[0]


def weights_epoch(done: dict, run_id: str) -> int:
    """The epoch whose weights stand for a finished run: its selected epoch, else its last."""
    epoch = done.get("selected_epoch") or done.get("final_metrics", {}).get("epoch")
    if not epoch:
        raise HarnessError(f"run {run_id}: {DONE_FILE} names no selected or last epoch; give --epoch")
    return int(epoch)


def read_done_markers(storage: str, run_ids: Sequence[str], options: StorageOptions | None = None) -> dict[str, dict]:
    """{run_id: done marker} of those of `run_ids` that are finished."""
    wanted = set(run_ids)
    return {run_id: read_done(storage, run_id, options) for run_id in finished_run_ids(storage, options)
            if run_id in wanted}


# -- writing ----------------------------------------------------------------------------------------
def write_run_file(storage: str, run_id: str, name: str, payload, options: StorageOptions | None = None) -> None:
    """Write (atomically replace) one JSON file of a run."""
    fs, root = filesystem(storage, options)

    def write():
        fs.makedirs(run_dir(root, run_id), exist_ok=True)
        put_atomic(fs, run_file(root, run_id, name), json.dumps(payload, indent=1, default=list).encode())

    with_retries(write, f"writing {run_file(storage, run_id, name)}")


def write_run_done(storage: str, spec: RunSpec, facts: dict, options: StorageOptions | None = None) -> dict:
    """The run's spec, then its done marker (last: its presence means every record is written); returns the
    marker as a run result."""
    summary = {"run_id": spec.run_id, "method": spec.method, "seed": spec.seed, "spec": spec.to_dict(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
    write_run_file(storage, spec.run_id, SPEC_FILE, spec.to_dict(), options)
    if facts.get("mlflow_gaps"):
        write_run_file(storage, spec.run_id, "mlflow_gaps.json", facts["mlflow_gaps"], options)
    write_run_file(storage, spec.run_id, DONE_FILE, summary, options)
    return {**summary, "skipped": False}
