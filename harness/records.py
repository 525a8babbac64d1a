"""Run records: one Parquet file per evaluation under `<storage>/records/<run_id>/epoch-NNNNN.parquet`.

Each row is one number: (run, epoch, split, domain kind, domain, track, eval batch size, controls,
metric) -> value. Writing the same (run, epoch) again replaces that file atomically, so a resumed run
never duplicates an epoch. Selection and tables are pure functions of these rows (DomainBed's lesson).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from platebench.datasets.storage import STORAGE_ERRORS, StorageOptions, describe_error, filesystem, join

from .errors import HarnessError

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
        ("protocol", pa.string()),  # "main" (the leaderboard's numbers) | "batch-size-sweep" | "controls-sweep"
        ("metric", pa.string()),  # "accuracy" | "loss"
        ("value", pa.float64()),
        ("n", pa.int64()),  # images behind the value
        ("code", pa.string()),  # harness version + source hash of the code that made the number
    ]
)
RECORDS_DIR = "records"
FULL_PLATE = 0


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
    suffix = "" if kind == "main" else f".{kind}"
    path = join(root, RECORDS_DIR, run_id, f"epoch-{epoch:05d}{suffix}.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(join(root, RECORDS_DIR, run_id), exist_ok=True)
        fs.pipe_file(tmp, buf.getvalue())
        fs.mv(tmp, path)
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"writing records to {storage}") from exc
    return path


def read_records(url: str, options: StorageOptions | None = None, run_ids: Iterable[str] | None = None) -> pa.Table:
    """All records under `url` (a storage root holding records/, or a records/ folder itself)."""
    fs, root = filesystem(url, options)
    base = root if root.rstrip("/").endswith(RECORDS_DIR) else join(root, RECORDS_DIR)
    try:
        if run_ids is None:
            files = sorted(fs.glob(join(base, "*", "epoch-*.parquet")))
        else:
            files = sorted(f for r in run_ids for f in fs.glob(join(base, r, "epoch-*.parquet")))
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"listing records under {url}") from exc
    tables = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                t = pq.read_table(fh)
        except (OSError, pa.ArrowInvalid) as exc:
            raise HarnessError(f"{f}: unreadable records file ({str(exc).splitlines()[0]})") from None
        if not t.schema.equals(RECORD_SCHEMA, check_metadata=False):
            raise HarnessError(f"{f}: records schema mismatch (expected {RECORD_SCHEMA.names}, got {t.schema.names})")
        tables.append(t)
    if not tables:
        return RECORD_SCHEMA.empty_table()
    return pa.concat_tables(tables)
