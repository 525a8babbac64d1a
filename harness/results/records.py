"""Run records: one Parquet file per evaluation under `<storage>/records/<run_id>/epoch-NNNNN.parquet`
(harness/results/layout.py).

Each row is one number: (run, epoch, split, domain kind, domain, track, eval batch size, controls,
metric) -> value. Writing the same (run, epoch) again replaces that file atomically, so a resumed run
never duplicates an epoch. Selection and tables are pure functions of these rows (DomainBed's lesson).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from platebench.datasets.storage import StorageOptions, filesystem, join, put_atomic, with_retries

from ..errors import HarnessError
from .layout import EPOCH_FILES, epoch_records_file, records_dir, storage_root
from .vocabulary import ACCURACY, DOMAIN_KINDS, LOSS, METRICS, PROTOCOLS, ROLES, TRACKS, is_main_overall

RECORD_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("dataset", pa.string()),  # manifest name
        ("dataset_checksum", pa.string()),  # Manifest.checksum()
        ("split_scheme", pa.string()),
        ("method", pa.string()),  # registered name, e.g. "abra+tta"
        ("track", pa.string()),  # "standard" | "tta"
        ("seed", pa.int64()),
        ("hparams", pa.string()),  # canonical JSON of the resolved hyperparameters
        ("epoch", pa.int64()),  # 1-based: epoch k = after k epochs of training
        ("split", pa.string()),  # split name in the scheme (train, val, id_test, test, ...)
        ("split_role", pa.string()),  # "train" | "val" | "test" (val = the scheme's selection split)
        ("domain_kind", pa.string()),  # "all" | "plate" | "batch" | "source" | "cell_type"
        ("domain", pa.string()),  # the domain value; "all" when domain_kind == "all"
        ("eval_batch_size", pa.int64()),  # 0 = the whole plate in one batch
        ("n_controls", pa.int64()),  # control rows appended to each evaluation batch
        ("protocol", pa.string()),  # "main" (the leaderboard's numbers) | the sweeps' | "representation"
        ("metric", pa.string()),  # "accuracy" | "loss" | the representation metrics (vocabulary.py)
        ("value", pa.float64()),
        ("n", pa.int64()),  # images behind the value
        ("code", pa.string()),  # harness version + source hash of the code that made the number
    ]
)
RUN_FIELDS = ("dataset", "dataset_checksum", "split_scheme", "method", "seed", "hparams", "code")


def overall(rows: Iterable[Mapping], *, split: str | None = None, role: str | None = None,
            metric: str = ACCURACY) -> dict[int, float]:
    """{epoch: value} of the main protocol's overall (domain "all") `metric` on one split, chosen by name or by
    role: the one accessor for "the validation accuracy of an epoch" and its kin."""
    picked = [r for r in rows if is_main_overall(r, metric)
              and (role is None or r["split_role"] == role) and (split is None or r["split"] == split)]
    if len({r["split"] for r in picked}) > 1:
        raise HarnessError(f"run {picked[0]['run_id']}: several {role} splits {sorted({r['split'] for r in picked})}; "
                           "a scheme has one selection split")
    curve: dict[int, float] = {}
    for r in picked:
        if r["epoch"] in curve:
            raise HarnessError(f"run {r['run_id']} epoch {r['epoch']}: two main overall {metric} values on split "
                               f"'{r['split']}'")
        curve[r["epoch"]] = r["value"]
    return curve


def main_value(rows: Iterable[Mapping], split: str, metric: str = ACCURACY) -> float | None:
    """The overall main-protocol `metric` on `split` in the rows of one evaluation (None when absent)."""
    values = list(overall(rows, split=split, metric=metric).values())
    return values[0] if values else None


def validate(records: pa.Table) -> None:
    """Refuse records the tables would misread: unknown vocabulary (vocabulary.py), bad epochs, and run ids whose
    identity (dataset, checksum, scheme, method, seed, hparams, version) is not constant."""
    checks = [("track", TRACKS), ("split_role", ROLES), ("domain_kind", DOMAIN_KINDS),
              ("protocol", PROTOCOLS), ("metric", METRICS)]
    for field, allowed in checks:
        seen = set(pc.unique(records.column(field)).to_pylist())
        bad = seen - set(allowed)
        if bad:
            raise HarnessError(f"records: field '{field}' has unknown value(s) {sorted(map(str, bad))} "
                               f"(allowed: {', '.join(allowed)})")
    for name in records.column_names:
        if records.column(name).null_count:
            raise HarnessError(f"records: field '{name}' has {records.column(name).null_count} empty (null) value(s)")
    # A loss may be NaN or infinite (a diverged training's last epoch); every other value must be finite.
    bad_value = pc.and_(pc.invert(pc.is_finite(records.column("value"))), pc.not_equal(records.column("metric"), LOSS))
    if len(records) and pc.any(bad_value).as_py():
        r = records.filter(bad_value).slice(0, 1).to_pylist()[0]
        raise HarnessError(f"records: run {r['run_id']} epoch {r['epoch']} split '{r['split']}': field 'value' is "
                           f"{r['value']} (values other than a loss must be finite)")
    if len(records) and pc.min(records.column("epoch")).as_py() < 1:
        raise HarnessError("records: field 'epoch' must be >= 1 (epochs are 1-based)")
    kind_all = pc.equal(records.column("domain_kind"), "all")
    bad_domain = pc.not_equal(kind_all, pc.equal(records.column("domain"), "all"))
    if len(records) and pc.any(bad_domain).as_py():
        r = records.filter(bad_domain).slice(0, 1).to_pylist()[0]
        raise HarnessError(f"records: run {r['run_id']}: domain '{r['domain']}' with domain_kind "
                           f"'{r['domain_kind']}' (domain is 'all' exactly when domain_kind is 'all')")
    # distinct (run_id, identity) combinations: more than one per run_id means a malformed run
    combos = records.select(["run_id", *RUN_FIELDS]).group_by(["run_id", *RUN_FIELDS]).aggregate([])
    identity: dict[str, dict] = {}
    for r in combos.to_pylist():
        prev = identity.setdefault(r["run_id"], r)
        if prev is not r:
            diff = [f for f in RUN_FIELDS if prev[f] != r[f]]
            raise HarnessError(f"records: run {r['run_id']} has rows with different {', '.join(diff)}")
    for r in identity.values():
        try:
            json.loads(r["hparams"])
        except (TypeError, ValueError):
            raise HarnessError(f"records: run {r['run_id']}: field 'hparams' is not JSON: {r['hparams']!r}") from None


def records_table(rows: Iterable[Mapping]) -> pa.Table:
    rows = list(rows)
    try:
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise HarnessError(f"records: rows do not match the record schema ({exc})") from None


def write_epoch_records(storage: str, run_id: str, epoch: int, rows: Iterable[Mapping],
                        options: StorageOptions | None = None, kind: str = "main") -> str:
    """Write (or atomically replace) the records of one evaluation of one run.

    `kind` "main" holds the per-epoch evaluation; "sweeps" the TTA sweeps run once on the selected epoch.
    """
    table = records_table(rows)
    bad = set(table.column("run_id").to_pylist()) - {run_id} or set(table.column("epoch").to_pylist()) - {epoch}
    if bad:
        raise HarnessError(f"records for run {run_id} epoch {epoch} contain rows of another run/epoch: {bad}")
    fs, root = filesystem(storage, options)
    path = epoch_records_file(root, run_id, epoch, kind)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")

    def write():
        fs.makedirs(records_dir(root, run_id), exist_ok=True)
        put_atomic(fs, path, buf.getvalue())

    with_retries(write, f"writing records to {storage}")
    return path


def read_records(url: str, options: StorageOptions | None = None, run_ids: Iterable[str] | None = None) -> pa.Table:
    """All records under `url` (a storage root holding records/, or a records/ folder itself); an unreadable records
    file is one line naming it."""
    records, unreadable = read_readable_records(url, options, run_ids)
    if unreadable:
        raise HarnessError(unreadable[min(unreadable)])
    return records


def read_readable_records(url: str, options: StorageOptions | None = None, run_ids: Iterable[str] | None = None
                          ) -> tuple[pa.Table, dict[str, str]]:
    """(records, {run_id: the line naming its unreadable file}): like `read_records`, but a run with an unreadable
    records file (truncated, not Parquet, another schema) is left out whole and named instead of failing the read
    (a leaderboard skips that run and reports it: harness/results/completeness.py)."""
    fs, root = filesystem(url, options)
    base = records_dir(storage_root(root))
    if run_ids is None:
        files = with_retries(lambda: sorted(fs.glob(join(base, "*", EPOCH_FILES))),
                             f"listing records under {url}")
    else:
        files = with_retries(lambda: sorted(f for r in run_ids for f in fs.glob(join(base, r, EPOCH_FILES))),
                             f"listing records under {url}")
    tables: dict[str, list[pa.Table]] = {}
    unreadable: dict[str, str] = {}
    for f in files:
        run_id = f.rstrip("/").split("/")[-2]
        if run_id in unreadable:
            continue
        data = with_retries(lambda f=f: fs.cat_file(f), f"reading {f}")
        try:
            t = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            unreadable[run_id] = f"{f}: unreadable records file ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
            continue
        if not t.schema.equals(RECORD_SCHEMA, check_metadata=False):
            unreadable[run_id] = (f"{f}: records schema mismatch (expected {RECORD_SCHEMA.names}, got "
                                  f"{t.schema.names})")
            continue
        tables.setdefault(run_id, []).append(t)
    kept = [t for run_id, ts in tables.items() if run_id not in unreadable for t in ts]
    return (pa.concat_tables(kept) if kept else RECORD_SCHEMA.empty_table()), unreadable
