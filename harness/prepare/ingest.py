"""The `platebench ingest` engine: raw layout -> plate shards, as a Ray Data job parallel over plates.

1. The adapter (platebench.datasets.adapters) plans on the driver; planning work that reads many small
   files (JUMP load_data) runs as Ray tasks through `pmap`.
2. `ray.data.from_items(plates)` + `map`, one plate per task: load_plate -> shards.write_plate -> a sidecar
   `plates/<plate>/_ingest.json` (the plate's content fingerprint, its part checksums, its skipped items).
3. The driver writes `skipped.json` and then, last, the manifest (shards.write_manifest).
Resuming: a plate whose sidecar fingerprint matches the plan and whose `_plate.json` parts still match their
checksums (shards.written_plate, verified inside the task so the hashing runs in parallel) is not rewritten.
A damaged or differently-configured plate is rewritten. Storage options travel to tasks explicitly.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from platebench.datasets import adapters
from platebench.datasets.errors import DatasetError, StorageError
from platebench.datasets.ingest_common import Adapter, IngestPlan
from platebench.datasets.manifest import MANIFEST_NAME, Part
from platebench.datasets.raw_io import read_json, write_json
from platebench.datasets.shards import write_manifest, write_plate, written_plate
from platebench.datasets.storage import StorageOptions, describe_error, filesystem, join

from .. import __version__
from ..errors import HarnessError

SIDECAR = "_ingest.json"
SKIPPED = "skipped.json"
EXECUTORS = ("ray", "local")
_ERRORS = {"DatasetError": DatasetError, "StorageError": StorageError}


# ---------------------------------------------------------------------------------------------
# one plate (runs inside a Ray task, or in-process with executor="local")
# ---------------------------------------------------------------------------------------------
def ingest_plate(adapter: Adapter, plan: IngestPlan, plate: Mapping, out: str, out_options: StorageOptions | None,
                 skip_bad: bool) -> dict:
    """Write (or keep) one plate. Returns a JSON-able result row; bad data comes back as an error row
    rather than an exception, so the driver can re-raise it with its own message."""
    name = plate["plate"]
    result = {"plate": name, "status": "", "rows": 0, "parts": "[]", "skipped": "[]", "error": "",
              "error_type": ""}
    try:
        fingerprint = plan.fingerprint(plate, skip_bad)
        sidecar_url = join(out.rstrip("/"), "plates", name, SIDECAR)
        side = read_json(sidecar_url, out_options)
        if isinstance(side, dict) and side.get("fingerprint") == fingerprint:
            parts = written_plate(out, name, out_options, verify=True)
            if parts is not None and [p.sha256 for p in parts] == side.get("parts_sha256"):
                return {**result, "status": "resumed", "rows": sum(p.rows for p in parts),
                        "parts": json.dumps([p.__dict__ for p in parts]), "skipped": json.dumps(side["skipped"])}
        skipped: list | None = [] if skip_bad else None
        table = adapter.load_plate(plan, plate, skipped)
        if table.num_rows == 0:
            return {**result, "status": "empty", "skipped": json.dumps(skipped or [])}
        parts = write_plate(out, name, table, image_nbytes=plan.image_nbytes, options=out_options)
        write_json(sidecar_url, {"plate": name, "fingerprint": fingerprint, "skipped": skipped or [],
                                 "parts_sha256": [p.sha256 for p in parts]}, out_options)
        return {**result, "status": "written", "rows": table.num_rows,
                "parts": json.dumps([p.__dict__ for p in parts]), "skipped": json.dumps(skipped or [])}
    except (DatasetError, StorageError) as exc:
        return {**result, "status": "error", "error": str(exc), "error_type": type(exc).__name__}


def _raise(row: dict) -> None:
    raise _ERRORS.get(row["error_type"], DatasetError)(row["error"])


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------
def _ray_pmap(fn: Callable, items: Iterable, chunk: int = 8) -> list:
    """Order-preserving parallel map over Ray tasks (planning work: many small reads)."""
    import ray

    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    run = ray.remote(num_cpus=1, max_retries=2)(_apply_all)
    refs = [run.remote(fn, items[i:i + chunk]) for i in range(0, len(items), chunk)]
    return [y for ref in refs for y in ray.get(ref)]


def _apply_all(fn: Callable, xs: list) -> list:
    return [fn(x) for x in xs]


def _run_local(adapter, plan, out, out_options, skip_bad) -> Iterator[dict]:
    shared = plan.shared()
    for plate in plan.plates:
        yield ingest_plate(adapter, shared, plate, out, out_options, skip_bad)


def _run_ray(adapter, plan, out, out_options, skip_bad, parallelism) -> Iterator[dict]:
    import logging

    import ray.data

    shared, name = plan.shared(), adapter.name

    def task(row: dict) -> dict:
        from platebench.datasets import adapters as registry

        return ingest_plate(registry.get(name), shared, json.loads(row["plate_json"]), out, out_options, skip_bad)

    kw = {"num_cpus": 1}
    if parallelism:
        kw["concurrency"] = int(parallelism)
    # One bar, ours, per plate: Ray Data's bars off and its INFO/WARNING chatter muted for this job only
    # (DataContext and loggers are process-wide; other jobs in the process get them back). A Dataset
    # copies the context when it is created, so set it first.
    ctx = ray.data.DataContext.get_current()
    log = logging.getLogger("ray.data")
    saved = (ctx.enable_progress_bars, log.level)
    ctx.enable_progress_bars = False
    log.setLevel(logging.ERROR)
    try:
        items = [{"plate_json": json.dumps(p)} for p in plan.plates]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        yield from ds.map(task, **kw).iter_rows()
    finally:
        ctx.enable_progress_bars, level = saved
        log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def run_ingest(dataset: str, config: Mapping, out: str, *, skip_bad: bool = False,
               src_options: StorageOptions | None = None, out_options: StorageOptions | None = None,
               executor: str = "ray", address: str | None = None, num_cpus: int | None = None,
               parallelism: int | None = None, progress: bool = True) -> dict:
    """Ingest one raw dataset into plate shards at `out`. Returns images (written in this run), seconds,
    images_per_s plus plate counts, skipped items and the manifest URL."""
    if executor not in EXECUTORS:
        raise HarnessError(f"executor {executor!r} is not one of {EXECUTORS}")
    adapter = adapters.get(dataset)
    out = str(out).rstrip("/")
    t0 = time.perf_counter()
    pmap: Callable = map
    if executor == "ray":
        from .. import ray_local

        ray_local.init(address=address, num_cpus=num_cpus)
        pmap = _ray_pmap
    plan = adapter.plan(dict(config), src_options=src_options, skip_bad=skip_bad, pmap=pmap)
    t_plan = time.perf_counter() - t0
    _makedirs(out, out_options)
    rows = (_run_ray(adapter, plan, out, out_options, skip_bad, parallelism) if executor == "ray"
            else _run_local(adapter, plan, out, out_options, skip_bad))
    parts: list[Part] = []
    skipped = list(plan.skipped)
    counts = {"written": 0, "resumed": 0, "empty": 0}
    images = 0
    bar = _bar(len(plan.plates), f"ingest {dataset}", progress)
    try:
        for row in rows:
            if row["status"] == "error":
                _raise(row)
            counts[row["status"]] += 1
            parts += [Part(**p) for p in json.loads(row["parts"])]
            skipped += json.loads(row["skipped"])
            if row["status"] == "written":
                images += row["rows"]
            bar.update(1)
            bar.set_postfix(images=images, skipped=len(skipped), refresh=False)
    finally:
        bar.close()
    written_plates = {p.plate for p in parts}
    if not written_plates:
        raise DatasetError(f"ingest {dataset}: nothing to write ({len(skipped)} item(s) skipped; see "
                           f"{join(out, SKIPPED)})" if skip_bad else f"ingest {dataset}: nothing to write")
    manifest = plan.manifest(parts, written_plates)
    manifest.provenance = {**manifest.provenance, "platebench": __version__, "skipped_items": len(skipped),
                           "skip_bad": skip_bad}
    write_json(join(out, SKIPPED), {"dataset": plan.name, "skip_bad": skip_bad, "count": len(skipped),
                                    "items": skipped}, out_options)
    write_manifest(out, manifest, out_options)
    seconds = time.perf_counter() - t0
    return {"dataset": plan.name, "out": out, "manifest": f"{out}/{MANIFEST_NAME}",
            "images": images, "images_total": manifest.rows, "seconds": seconds, "plan_seconds": t_plan,
            "images_per_s": images / seconds if seconds > 0 else 0.0, "plates_written": counts["written"],
            "plates_resumed": counts["resumed"], "plates_empty": counts["empty"], "skipped": len(skipped)}


def _makedirs(out: str, options: StorageOptions | None) -> None:
    fs, path = filesystem(out, options)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise describe_error(exc, out) from exc


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="plate", file=sys.stderr, dynamic_ncols=True)
