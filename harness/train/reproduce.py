"""Re-running stored runs from their specs and comparing every number they recorded (`platebench validate
--reproduce`).

A run's records are a function of its spec on a CPU (tests/test_determinism.py): the same spec, code and dataset
write the same rows, bit for bit, whatever the machine's load. So a maintainer re-runs some runs of a bundle from
their spec.json, with the same machinery as `platebench run` (`runner.run_many`, no MLflow, the run's recorded
number of workers, on this machine's CPU) into a temporary storage folder (never into the bundle), and compares:
- every records file of the run (`records/<run_id>/epoch-*.parquet`): the same files, the same rows, every column
  of every row equal (`value` bit for bit);
- the done marker's numbers that the spec determines (DONE_NUMBERS).
Never compared, because they are not a function of the spec: the done marker's NOT_REPRODUCIBLE fields
(wall-clock timings, dates, versions, machine, MLflow ids). A run that trained on a GPU is re-run on the CPU
too, where floating point takes another path: its `value`s must agree within GPU_TOLERANCE (everything else
exactly).

A variant that shares its parent's training (`trains_as`) is re-run in the same job as the runs it shared its
training with (its done marker's "shared_with"): the training is the parent's, and each run of the job is also
tested at the others' selectable epochs. Those runs come from the bundle, or, when it lacks them, are rebuilt
from the variant's training hyperparameters (their prediction-only ones at their defaults).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from platebench.datasets.storage import StorageOptions, filesystem, join, with_retries

from ..errors import HarnessError
from ..results.layout import (
    EPOCH_FILES,
    SPEC_FILE,
    finished_run_ids,
    read_done,
    read_run_json,
    records_dir,
    storage_root,
)
from ..results.records import RECORD_SCHEMA
from .code_identity import code_identity, code_label
from .runspec import RunSpec, resolve_run_hparams

# The done marker's fields that a run's spec determines: compared like the records.
DONE_NUMBERS = ("training_id", "shared_with", "selected_epoch", "selectable_epochs", "final_metrics")
# The done marker's fields that are not a function of the spec: never compared.
NOT_REPRODUCIBLE = ("timings", "finished", "environment", "resources", "placement", "git_commit", "mlflow_run_id",
                    "mlflow_gaps")
# |recorded - reproduced| allowed for each `value` of a run that trained on a GPU (re-run on the CPU here).
GPU_TOLERANCE = 0.02
# The columns that say which number a record row is.
ROW_KEY = [n for n in RECORD_SCHEMA.names if n not in ("value", "n")]


@dataclass
class Plan:
    """What `execute` re-runs: the chosen runs and every run sharing a training with them, by worker count."""

    root: str
    seed: int
    candidates: list[str]  # finished runs on the --data dataset, sorted
    chosen: list[str]
    jobs: list[tuple[int, list[RunSpec]]]  # (workers, the runs of one original job, in its order)
    compared: list[str]  # the runs whose numbers are compared: the chosen and their bundled job mates
    tolerance: dict[str, float]  # run id -> the tolerance on its values (0.0: bit for bit)
    rebuilt: list[str] = field(default_factory=list)  # "method (for run X)" rebuilt from a training's hparams
    elsewhere: int = 0  # finished runs on other datasets (not candidates)

    def header(self) -> str:
        mates = sorted(set(self.compared) - set(self.chosen))
        lines = [f"reproducing {len(self.chosen)} of {len(self.candidates)} run(s) (chosen with --seed {self.seed}): "
                 f"{', '.join(self.chosen)}"]
        if mates:
            lines.append(f"  and {len(mates)} run(s) that shared their trainings: {', '.join(mates)}")
        if self.rebuilt:
            lines.append(f"  rebuilt from the training's hyperparameters (not here): {'; '.join(self.rebuilt)}")
        if self.elsewhere:
            lines.append(f"  {self.elsewhere} run(s) on other datasets are not candidates")
        return "\n".join(lines)


def choose(run_ids: Sequence[str], count: int | None, seed: int) -> list[str]:
    """`count` of `run_ids` drawn with `seed` (None, or more than there are: all), sorted: the same ids for the
    same bundle and seed."""
    ids = sorted(run_ids)
    if count is None or count >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, count))


def plan(url: str, data: str | None, count: int | None, seed: int, options: StorageOptions | None = None) -> Plan:
    """Choose the runs to re-run and check, before anything starts, that they can be: `data` is their dataset
    (the same checksum) and this installation's code is theirs (the same code identity). One line otherwise."""
    from platebench.datasets.shards import open_dataset

    root = storage_root(url)
    dones = {r: read_done(root, r, options) for r in finished_run_ids(root, options)}
    specs = {r: read_run_json(root, r, SPEC_FILE, options) or d.get("spec") for r, d in dones.items()}
    if not dones:
        raise HarnessError(f"{url}: no finished run to reproduce")
    if unspecified := sorted(r for r, s in specs.items() if not isinstance(s, dict)):
        raise HarnessError(f"run {unspecified[0]}: no {SPEC_FILE}: it cannot be reproduced")
    datasets = sorted({(s["dataset"], s["dataset_checksum"]) for s in specs.values()})
    named = ", ".join(f"{n} (checksum {c[:16]}…)" for n, c in datasets)
    if not data:
        raise HarnessError(f"--reproduce needs --data: the root of the dataset the runs trained on ({named})")
    manifest = open_dataset(data, options).manifest
    checksum = manifest.checksum()
    candidates = sorted(r for r, s in specs.items() if s["dataset_checksum"] == checksum)
    if not candidates:
        raise HarnessError(f"--data {data}: dataset '{manifest.name}' with checksum {checksum[:16]}… is not the "
                           f"dataset of any run in {url} ({named}): another dataset or version")
    chosen = choose(candidates, count, seed)
    out = Plan(root=root, seed=seed, candidates=candidates, chosen=chosen, jobs=[], compared=[], tolerance={},
               elsewhere=len(specs) - len(candidates))
    seen_jobs: set[tuple[str, ...]] = set()
    for run_id in chosen:
        job = _job(run_id, dones, specs, data, out)
        key = tuple(s.run_id for s in job)
        if key in seen_jobs:
            continue
        seen_jobs.add(key)
        workers = int((dones[run_id].get("resources") or {}).get("workers") or 1)
        out.jobs.append((workers, job))
        for spec in job:
            if spec.run_id in dones and spec.run_id not in out.compared:
                out.compared.append(spec.run_id)
                device = str((dones[spec.run_id].get("resources") or {}).get("device") or "cpu")
                out.tolerance[spec.run_id] = 0.0 if device.startswith("cpu") else GPU_TOLERANCE
    return out


def _spec(run_id: str, stored: dict, data: str) -> RunSpec:
    """The stored spec as this installation runs it, refused when this installation's code is not the run's."""
    from platebench.methods import get_method

    spec = RunSpec.from_dict({**stored, "data": data})
    if spec.run_id != run_id:
        raise HarnessError(f"run {run_id}: its spec hashes to run id {spec.run_id} (`platebench validate` names the "
                           "field): not reproducible")
    installed = code_identity(get_method(spec.method))
    if installed != spec.code:
        raise HarnessError(f"run {run_id}: made by code {code_label(spec.code)}, this installation is "
                           f"{code_label(installed)}: install the platebench that made it to reproduce it")
    return spec


def _job(run_id: str, dones: dict, specs: dict, data: str, out: Plan) -> list[RunSpec]:
    """The runs of `run_id`'s original job, in its order (done marker "shared_with"): from the bundle where it has
    them, else rebuilt from `run_id`'s training hyperparameters."""
    from platebench.methods import get_method

    done, spec = dones[run_id], _spec(run_id, specs[run_id], data)
    training = spec.training().training_id
    if done.get("training_id") not in (None, training):
        raise HarnessError(f"run {run_id}: trained as {done['training_id']}, this installation trains it as "
                           f"{training} (the code of the method it trains as differs): not reproducible here")
    shared = list(done.get("shared_with") or [spec.method])
    mates = [run_id] + [r for r in sorted(dones) if r != run_id and dones[r].get("training_id") == training
                        and list(dones[r].get("shared_with") or []) == shared]
    job, used = [], set()
    for method in shared:
        mate = next((r for r in mates if r not in used and specs[r]["method"] == method), None)
        if mate is not None:
            used.add(mate)
            job.append(spec if mate == run_id else _spec(mate, specs[mate], data))
            continue
        cls = get_method(spec.method)
        hparams = resolve_run_hparams(method, cls.training_hparams(spec.hparams))
        rebuilt = dataclasses.replace(spec, method=method, hparams=hparams, code=code_identity(get_method(method)))
        if rebuilt.training().training_id != training:
            raise HarnessError(f"run {run_id}: shared its training with a run of {method} that is not here and "
                               "cannot be rebuilt from its training hyperparameters: not reproducible")
        out.rebuilt.append(f"{method} (for run {run_id})")
        job.append(rebuilt)
    return job


def execute(p: Plan, on_event: Callable | None = None, options: StorageOptions | None = None) -> tuple[list[str], dict]:
    """Re-run the plan's jobs into a temporary storage folder and compare. Returns (problems: one line per run that
    failed or differs, naming its first difference; {run_id: records compared} of the runs that agree)."""
    from .. import ray_local
    from .runner import Launch, run_many

    ray_local.init(num_cpus=max(os.cpu_count() or 2, *(w for w, _ in p.jobs)) + 1)  # as a local `platebench run`
    problems, agreed, failed = [], {}, set()
    with tempfile.TemporaryDirectory(prefix="pb-reproduce-") as tmp:
        for workers, specs in _rounds(p.jobs):
            launch = Launch(storage=tmp, workers=workers, mlflow=None)
            results, _ = run_many(specs, launch, max(1, (os.cpu_count() or 2) // workers), on_event)
            for r in results:
                if "error" in r and r["run_id"] in p.compared and r["run_id"] not in failed:
                    failed.add(r["run_id"])
                    problems.append(f"run {r['run_id']}: the reproduction failed: {r['error']}")
        for run_id in p.compared:
            if run_id in failed:
                continue
            difference, n = compare_run(p.root, tmp, run_id, p.tolerance[run_id], options)
            if difference:
                problems.append(f"run {run_id}: {difference}")
            else:
                agreed[run_id] = n
    return problems, agreed


def _rounds(jobs: list[tuple[int, list[RunSpec]]]) -> list[tuple[int, list[RunSpec]]]:
    """The jobs as few `run_many` calls as can be: one worker count each, and no two jobs of one training in one
    call (run_many would make them one job, whose runs would be tested at each other's epochs)."""
    rounds: list[tuple[int, list[RunSpec], set[str]]] = []
    for workers, job in jobs:
        training = job[0].training().training_id
        target = next((r for r in rounds if r[0] == workers and training not in r[2]), None)
        if target is None:
            target = (workers, [], set())
            rounds.append(target)
        target[1].extend(job)
        target[2].add(training)
    return [(w, specs) for w, specs, _ in rounds]


# -- the comparison ----------------------------------------------------------------------------------------------
def _record_files(root: str, run_id: str, options: StorageOptions | None) -> dict[str, pa.Table]:
    fs, base = filesystem(root, options)
    folder = records_dir(base, run_id)
    files = with_retries(lambda: sorted(fs.glob(join(folder, EPOCH_FILES))), f"listing {folder}")
    return {f.rsplit("/", 1)[1]: pq.read_table(io.BytesIO(with_retries(lambda f=f: fs.cat_file(f), f"reading {f}")))
            for f in files}


def _same(recorded, reproduced, tolerance: float) -> bool:
    if isinstance(recorded, float) and isinstance(reproduced, float) and tolerance:
        return math.isclose(recorded, reproduced, rel_tol=0.0, abs_tol=tolerance)
    return recorded == reproduced


def compare_tables(recorded: pa.Table, reproduced: pa.Table, tolerance: float = 0.0) -> str | None:
    """The first difference between two records files ("row I (which number): column 'C' recorded A, reproduced
    B"; I is the row's index in the recorded file), None when every row and column agrees (`value` within
    `tolerance`; 0.0: bit for bit)."""
    def keyed(t: pa.Table) -> dict[tuple, tuple[int, dict]]:
        return {tuple(r[k] for k in ROW_KEY): (i, r) for i, r in enumerate(t.to_pylist())}

    a, b = keyed(recorded), keyed(reproduced)
    for key, (i, row) in sorted(a.items(), key=lambda kv: kv[1][0]):
        what = _describe(row)
        if key not in b:
            return f"row {i} ({what}): recorded, not reproduced"
        other = b[key][1]
        for column in RECORD_SCHEMA.names:
            if not _same(row[column], other[column], tolerance if column == "value" else 0.0):
                return f"row {i} ({what}): column '{column}' recorded {row[column]!r}, reproduced {other[column]!r}"
    extra = [r for k, (_, r) in b.items() if k not in a]
    if extra:
        return f"a row not recorded was reproduced ({_describe(extra[0])})"
    if len(recorded) != len(reproduced):  # duplicate keys in one of them
        return f"{len(recorded)} rows recorded, {len(reproduced)} reproduced"
    return None


def _describe(row: dict) -> str:
    return (f"epoch {row['epoch']} split '{row['split']}' {row['domain_kind']}={row['domain']} {row['protocol']} "
            f"batch {row['eval_batch_size']} controls {row['n_controls']} {row['metric']}")


def compare_run(recorded_root: str, reproduced_root: str, run_id: str, tolerance: float = 0.0,
                options: StorageOptions | None = None) -> tuple[str | None, int]:
    """(the first difference of `run_id`'s numbers between two storage roots, naming the file, row and column;
    the number of records compared). The done marker's DONE_NUMBERS are compared too."""
    rec, rep = _record_files(recorded_root, run_id, options), _record_files(reproduced_root, run_id, options)
    for name in sorted(set(rec) | set(rep)):
        if name not in rep:
            return f"file records/{run_id}/{name}: recorded, not reproduced", 0
        if name not in rec:
            return f"file records/{run_id}/{name}: reproduced, not recorded", 0
        difference = compare_tables(rec[name], rep[name], tolerance)
        if difference:
            return f"file records/{run_id}/{name}: {difference}", 0
    done_rec, done_rep = read_done(recorded_root, run_id, options), read_done(reproduced_root, run_id, options)
    for key in DONE_NUMBERS:
        a, b = done_rec.get(key), (done_rep or {}).get(key)
        if key == "final_metrics" and isinstance(a, dict) and isinstance(b, dict):
            same = a.keys() == b.keys() and all(_same(a[k], b[k], tolerance) for k in a)
        else:
            same = a == b
        if not same:
            return f"file runs/{run_id}/done.json: field '{key}' recorded {a!r}, reproduced {b!r}", 0
    return None, sum(len(t) for t in rec.values())
