"""Which runs of a storage root a leaderboard may rank: the complete ones.

A run is complete when
- every records file of it reads (a truncated file, or one that is not records, leaves the whole run out);
- it has its done marker (runs/<run_id>/done.json, written last: without it the run did not finish);
- it has validation records at every epoch its training ran (done.json `final_metrics.epoch`; without that field,
  every epoch up to the last one recorded): a missing epoch would make selection choose another one;
- where its dataset and scheme have test splits, it has test records at every epoch a selection rule can choose
  and at the epochs its done marker names (`selectable_epochs`, `selected_epoch`).
An incomplete run is left out and reported, one line naming the run and what is missing, so one bad run neither
blocks a leaderboard nor silently changes a number. A done marker that contradicts itself or its run's records
(another run id, method or seed; epochs outside its training; a selected epoch its validation records do not
select) is an error naming the file: it was edited, and which side is right cannot be told.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from platebench.datasets.storage import StorageOptions

from ..errors import HarnessError
from .layout import DONE_FILE, RUNS_DIR, epoch_records_file, finished_run_ids, read_done, run_file, storage_root
from .records import overall, read_readable_records, validate
from .selection import LEADERBOARD_RULES, select_epoch
from .vocabulary import ACCURACY, ALL, LOSS, MAIN


@dataclass
class Complete:
    records: pa.Table  # the complete runs' records only
    done: dict[str, dict]  # run_id -> done marker, of the complete runs
    skipped: list[dict] = field(default_factory=list)  # {"run_id", "method", "seed", "reason"} per run left out


def read_complete(url: str, options: StorageOptions | None = None, run_ids: Iterable[str] | None = None) -> Complete:
    """The complete runs under the storage root `url` (of `run_ids`, default all) and the runs left out."""
    root = storage_root(url)
    records, unreadable = read_readable_records(root, options, run_ids)
    validate(records)  # rows the tables would misread are an error, whatever run they belong to
    present = set(pc.unique(records.column("run_id")).to_pylist())
    finished = set(finished_run_ids(root, options)) & present
    done = {run_id: read_done(root, run_id, options) for run_id in sorted(finished)}
    reasons = dict(unreadable)
    for run_id in sorted(present - finished):
        reasons[run_id] = f"no done marker ({RUNS_DIR}/{run_id}/{DONE_FILE}): the run did not finish"
    reasons.update(missing_records(records, done, root))
    keep = sorted(present - set(reasons))
    kept = records.filter(pc.is_in(records.column("run_id"), pa.array(keep, pa.string())))
    who = _identities(records)
    skipped = [{"run_id": run_id, **who.get(run_id, {"method": None, "seed": None}), "reason": reason}
               for run_id, reason in sorted(reasons.items())]
    return Complete(kept, {run_id: done[run_id] for run_id in keep}, skipped)


def describe(skipped: Mapping) -> str:
    """One line for a run left out."""
    what = f" ({skipped['method']} seed {skipped['seed']})" if skipped.get("method") is not None else ""
    where = f" in {skipped['source']}" if skipped.get("source") else ""
    return f"run {skipped['run_id']}{what}{where} left out: {skipped['reason']}"


def _identities(records: pa.Table) -> dict[str, dict]:
    pairs = records.select(["run_id", "method", "seed"]).group_by(["run_id", "method", "seed"]).aggregate([])
    return {r["run_id"]: {"method": r["method"], "seed": r["seed"]} for r in pairs.to_pylist()}


def _epoch(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def missing_records(records: pa.Table, done: Mapping[str, Mapping], root: str) -> dict[str, str]:
    """{run_id: what is missing} of the runs in `done` whose records lack an epoch (module docstring); a done marker
    that contradicts itself or its records is a HarnessError naming it."""
    col = records.column
    overall_rows = pc.and_(pc.and_(pc.equal(col("domain_kind"), ALL), pc.equal(col("protocol"), MAIN)),
                           pc.and_(pc.is_in(col("split_role"), pa.array(["val", "test"])),
                                   pc.is_in(col("metric"), pa.array([ACCURACY, LOSS]))))
    rows_by_run: dict[str, list[dict]] = defaultdict(list)
    tested: set[tuple[str, str]] = set()  # (dataset, scheme) with test records in some run: its scheme has tests
    for r in records.filter(overall_rows).to_pylist():
        rows_by_run[r["run_id"]].append(r)
        if r["split_role"] == "test":
            tested.add((r["dataset"], r["split_scheme"]))
    out = {}
    for run_id, marker in done.items():
        rows = rows_by_run.get(run_id, [])
        if not rows:
            out[run_id] = "no overall validation or test records"
            continue
        reason = _missing(run_id, rows, marker, run_file(root, run_id, DONE_FILE), root,
                          (rows[0]["dataset"], rows[0]["split_scheme"]) in tested)
        if reason:
            out[run_id] = reason
    return out


def _missing(run_id: str, rows: list[dict], done: Mapping, where: str, root: str, has_tests: bool) -> str | None:
    first = rows[0]
    for key, want in (("run_id", run_id), ("method", first["method"]), ("seed", first["seed"])):
        if key in done and done[key] != want:
            raise HarnessError(f"{where}: field '{key}' says {done[key]!r}, the run's records say {want!r} (the done "
                               "marker was edited or belongs to another run)")
    final = done.get("final_metrics")
    epochs = final.get("epoch") if isinstance(final, dict) else None
    claimed, listed = done.get("selected_epoch"), done.get("selectable_epochs")
    if epochs is not None and not _epoch(epochs):
        raise HarnessError(f"{where}: field 'final_metrics.epoch' must be an epoch >= 1, got {epochs!r}")
    if claimed is not None and not _epoch(claimed):
        raise HarnessError(f"{where}: field 'selected_epoch' must be an epoch >= 1, got {claimed!r}")
    if listed is not None and not (isinstance(listed, list) and all(_epoch(e) for e in listed)):
        raise HarnessError(f"{where}: field 'selectable_epochs' must be a list of epochs >= 1, got {listed!r}")
    val = overall(rows, role="val")
    named = [*([claimed] if claimed else []), *(listed or [])]  # epochs the marker says the run had
    if epochs is not None:
        beyond = [e for e in [*named, *val] if e > epochs]
        if beyond:
            raise HarnessError(f"{where}: field 'final_metrics.epoch' says the training ran {epochs} epoch(s), but "
                               f"epoch {max(beyond)} is selected or recorded")
    last = epochs or max([*val, *named], default=0)
    if not val:
        return "no validation records (split_role 'val'): its epoch cannot be selected"
    gaps = sorted(set(range(1, last + 1)) - set(val))
    if gaps:
        return (f"no validation records at epoch(s) {gaps} of its {last} "
                f"({epoch_records_file(root, run_id, gaps[0])} is missing or lacks them)")
    best = select_epoch(rows, "val").epoch
    if claimed is not None and claimed != best:
        raise HarnessError(f"{where}: field 'selected_epoch' says {claimed}, the run's validation records select "
                           f"epoch {best} (the done marker or the records were edited)")
    if not has_tests:
        return None
    need = {*(listed or []), *([claimed] if claimed else [])}
    for rule in LEADERBOARD_RULES:
        try:
            need.add(select_epoch(rows, rule).epoch)
        except HarnessError:  # a rule this run's records cannot apply (no validation loss): nothing to need
            continue
    lacking = sorted(need - {r["epoch"] for r in rows if r["split_role"] == "test"})
    if lacking:
        return (f"no test records at selectable epoch(s) {lacking} "
                f"({epoch_records_file(root, run_id, lacking[0], 'tests')} is missing or lacks them)")
    return None
