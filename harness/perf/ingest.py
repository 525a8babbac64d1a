"""Ingestion throughput (images/s): the Ray Data job parallel over plates vs a plain process pool.

Both write the same shards from the same raw tree with the same per-plate code
(`ingest_job.ingest_plate`: decode, stack, zstd write, sidecar) and the same parallelism: the pool has
as many processes as the Ray job may run tasks (its CPUs, or `parallelism`). The headline `ratio` is the
first Ray job (what `platebench ingest` costs when run once: like the command, it starts Ray inside its clock,
then its workers start and import) over the pool (which also pays its processes' start-up); a second Ray job
into a fresh folder gives the warm figure. The pool runs first, before Ray exists. `ray_cold_includes_startup`
is false where Ray was running before the first job (this process had started it, or it joined a cluster to
count its CPUs for the pool): its figure then lacks Ray's start-up.

Without `--src`, a raw RxRx1-layout tree (metadata.csv + one 8-bit PNG per channel and site) is
generated first, so the command measures decode + stack + write on this machine. With `--src`, the
real layout is read (e.g. a local copy of RxRx1, or the s3:// archive on a cluster).
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import HarnessError
from ..prepare.ingest import SKIPPED, ingest_plate, run_ingest

COLUMNS = ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type", "sirna",
           "sirna_id"]
KEYS = ("ratio", "ray_cold_images_per_s", "ray_warm_images_per_s", "pool_images_per_s", "ray_warm_vs_pool",
        "ray_cold_seconds", "ray_warm_seconds", "pool_seconds", "ray_cold_includes_startup", "workers", "images",
        "plates", "layout", "src")


def make_rxrx1_layout(root: Path, experiments: int = 3, size: int = 128, seed: int = 0, wells: int = 308) -> int:
    """A format-faithful RxRx1 tree (metadata.csv, per-channel PNGs), random pixels; returns the image count.

    Each experiment follows the real design: its 4 plates hold the 1,108 treatment siRNAs once (277 per
    plate), plus the 30 positive controls and the negative control on every plate (308 wells), 2 sites
    each. The last experiment is the test experiment. `wells` < 308 shrinks each plate to that many wells
    (wells - 2 treatments, one positive and the negative control), for quick checks.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"{chr(ord('B') + i // 22)}{i % 22 + 2:02d}" for i in range(308)]
    # Per plate: `per_plate` treatments, `positives` positive controls, one negative; ids stay contiguous.
    per_plate, positives = (277, 30) if wells >= 308 else (max(1, wells - 2), 1)
    treatments = 4 * per_plate
    negative = treatments + positives
    rows = []
    for e in range(experiments):
        exp = f"HUVEC-{e + 1:02d}"
        for plate in range(1, 5):
            ids = list(range((plate - 1) * per_plate, plate * per_plate)) + list(range(treatments, negative + 1))
            for well, sid in zip(names, ids):
                kind = ("negative_control" if sid == negative else "positive_control" if sid >= treatments
                        else "treatment")
                folder = root / "images" / exp / f"Plate{plate}"
                folder.mkdir(parents=True, exist_ok=True)
                for site in (1, 2):
                    rows.append({"site_id": f"{exp}_{plate}_{well}_{site}", "well_id": f"{exp}_{plate}_{well}",
                                 "cell_type": "HUVEC", "dataset": "test" if e == experiments - 1 else "train",
                                 "experiment": exp, "plate": plate, "well": well, "site": site, "well_type": kind,
                                 "sirna": "EMPTY" if kind == "negative_control" else f"s{sid:05d}",
                                 "sirna_id": sid})
                    for ch in range(1, 7):
                        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                            folder / f"{well}_s{site}_w{ch}.png", compress_level=1)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _pool_plate(args: tuple) -> dict:
    from platebench.datasets import adapters

    name, shared, plate, out = args
    return ingest_plate(adapters.get(name), shared, plate, out, None, False)


def pool_ingest(layout: str, config: dict, out: str, workers: int) -> dict:
    """`run_ingest`'s job with a ProcessPoolExecutor in place of Ray Data: plan on the driver, one plate per
    task, then skipped.json and the manifest, as `platebench ingest` writes them."""
    from platebench.datasets import adapters
    from platebench.datasets.manifest import Part
    from platebench.datasets.raw_io import write_json
    from platebench.datasets.shards import write_manifest
    from platebench.datasets.storage import join

    from .. import __version__

    t0 = time.perf_counter()
    adapter = adapters.get(layout)
    plan = adapter.plan(dict(config))
    Path(out).mkdir(parents=True, exist_ok=True)
    shared = plan.shared()
    # forkserver with the ingest code preloaded: no fork of a driver that runs Ray's threads, and no
    # per-process re-import as with spawn (the Ray job's workers are prestarted too).
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["platebench.harness.prepare.ingest", "platebench.datasets.adapters"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        rows = list(pool.map(_pool_plate, [(adapter.name, shared, p, out) for p in plan.plates]))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        raise HarnessError(f"perf ingest: the process pool failed on plate {errors[0]['plate']}: {errors[0]['error']}")
    parts = [Part(**p) for r in rows for p in json.loads(r["parts"])]
    images = sum(r["rows"] for r in rows if r["status"] == "written")
    manifest = plan.manifest(parts, {p.plate for p in parts})
    manifest.provenance = {**manifest.provenance, "platebench": __version__, "skipped_items": 0, "skip_bad": False}
    write_json(join(out, SKIPPED), {"dataset": plan.name, "skip_bad": False, "count": 0, "items": []}, None)
    write_manifest(out, manifest, None)
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def ray_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run(src: str | None = None, layout: str = "rxrx1", experiments: int = 3, size: int = 128,
        parallelism: int | None = None, wells: int = 308, work: str | None = None, address: str | None = None,
        num_cpus: int | None = None) -> dict:
    """`work`: where the generated tree and the three outputs go (kept); default a temporary folder, removed.
    `address`, `num_cpus`: the Ray the first job starts or joins, as `platebench ingest --address --num-cpus`."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="pb-perf-ingest-") as tmp:
            return run(src, layout, experiments, size, parallelism, wells, tmp, address, num_cpus)
    work = Path(work)
    label = src or f"generated rxrx1 layout: {experiments} experiment(s), {wells} wells/plate, {size} px"
    if src is None:
        if layout != "rxrx1":
            raise HarnessError("without --src, perf ingest generates an rxrx1 layout only")
        src = str(work / "raw")
        Path(src).mkdir(parents=True)
        make_rxrx1_layout(Path(src), experiments=experiments, size=size, wells=wells)
    config = {"src": src, "resize": None, "crop": None, "version": "perf"}
    import ray

    from .. import ray_local

    workers = parallelism or (num_cpus if not address and not ray.is_initialized() else None)
    if workers is None:  # a cluster's (or a running Ray's) CPUs: known once joined
        ray_local.init(address=address, num_cpus=num_cpus)
        workers = ray_cpus()
    pool = pool_ingest(layout, config, str(work / "pool"), workers)
    # Fresh outputs each: the first Ray job is what a user runs (Ray's start-up inside its clock, as in
    # `platebench ingest`); the second shows it warm.
    cold_startup = not ray.is_initialized()
    cold = run_ingest(layout, config, str(work / "ray-1"), executor="ray", address=address, num_cpus=num_cpus,
                      parallelism=workers, progress=False)
    warm = run_ingest(layout, config, str(work / "ray-2"), executor="ray", parallelism=workers, progress=False)
    if not pool["images"] == cold["images"] == warm["images"]:
        raise RuntimeError(f"perf ingest: images written differ (pool {pool['images']}, Ray {cold['images']}, "
                           f"{warm['images']})")
    return {"ratio": cold["images_per_s"] / pool["images_per_s"], "ray_cold_images_per_s": cold["images_per_s"],
            "ray_warm_images_per_s": warm["images_per_s"], "pool_images_per_s": pool["images_per_s"],
            "ray_warm_vs_pool": warm["images_per_s"] / pool["images_per_s"], "ray_cold_seconds": cold["seconds"],
            "ray_warm_seconds": warm["seconds"], "pool_seconds": pool["seconds"],
            "ray_cold_includes_startup": cold_startup, "workers": workers,
            "images": cold["images"], "plates": cold["plates_written"], "layout": layout, "src": label}
