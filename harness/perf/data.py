"""Stream throughput: plate-pure batches decoded to standardised tensors, measured against three baselines.

All read the same parts (the labelled rows of the dataset's plates, or the first `limit_parts` parts'
plates) and deliver the same batches: the same `Rebatcher` and `batching.to_batch` conversion.
- stream: the harness's Ray Data `PlateStream`, `parallelism` concurrent read tasks;
- pyarrow (the headline `ratio`'s baseline): the same stream with Ray Data's reads replaced by plain
  pyarrow in `parallelism` threads, so the ratio isolates what Ray Data costs;
- DataLoader: what a user would write without Ray, a torch DataLoader with `parallelism` worker
  processes over a Dataset of plates, each item one plate's batches;
- limit: what one core can do at best, Parquet/zstd decompression (`pyarrow.parquet.read_table`, no
  threads) plus the same host conversion of the same parts (`to_batch`: the stored uint8 images as one
  tensor; the float conversion runs on the training device), with no re-batching. The stream's images/s per
  core it can use (its read tasks plus the process that converts) as a fraction of it says how much of
  the machine the stream turns into batches.
Every path stops at the host batch (uint8): what the CPU side of a worker must deliver to its device.
Two figures say where the rest of a core goes: the limit run in as many processes as the stream's cores at
once, each on its share of the parts (does this machine's second core add a core's worth?), and what one part
costs on one core at each step the stream takes and the limit does not: its SHA-256 check (every read is
verified) and its copy into Ray's object store (how a read task hands it on), beside its read and decompression.
The quickstart model's training rate (resnet-tiny, 32 px, batch 32, one thread, tensors in memory) is
measured in the same process: the stream must outpace it.
The machine's busy CPU time during each timed path (every process: read workers, the raylet, the consumer)
says what each path costs for the same batches, whatever its wall time; it counts only this machine, so it is
meaningful for a local Ray (not with `--address` on a cluster whose tasks run elsewhere).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from platebench.datasets.shards import ShardDataset
from platebench.datasets.storage import join
from platebench.methods.backbones import DEFAULT_BACKBONE

from ..data.batching import DomainIndex, to_batch
from ..data.rebatch import RowBatch
from ..data.stream import PlateStream, StreamConfig
from .plain import PlainPlateStream, close_loader, plate_loader

KEYS = ("ratio", "stream_images_per_s", "stream_mb_per_s", "pyarrow_images_per_s", "pyarrow_mb_per_s",
        "dataloader_images_per_s", "stream_vs_dataloader", "limit_images_per_s_per_core",
        "stream_images_per_s_per_core", "stream_cores", "stream_fraction_of_limit",
        "quickstart_train_images_per_s", "stream_vs_train", "stream_cpu_ms_per_image", "pyarrow_cpu_ms_per_image",
        "stream_cpu_vs_pyarrow", "stream_busy_fraction", "pyarrow_busy_fraction", "limit_all_cores_images_per_s",
        "limit_core_scaling", "part_mb", "part_read_ms", "part_checksum_ms", "part_object_store_ms", "images",
        "batches", "plates", "batch_size", "parallelism", "image_shape", "dataset")


def stream_config(ds: ShardDataset, batch_size: int, parallelism: int, limit_parts: int | None) -> StreamConfig:
    parts = ds.manifest.parts[:limit_parts] if limit_parts else ds.manifest.parts
    return StreamConfig.for_evaluation(None, None, batch_size, read_concurrency=parallelism,
                                       plates=tuple(sorted({p.plate for p in parts})))


def _busy_cpu_s() -> float:
    """CPU-seconds this machine's cores have spent busy (all processes) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _timed(batches: Callable[[], Iterable]) -> dict:
    """Images and batches delivered by `batches()`, its wall time and the machine's busy CPU time meanwhile."""
    n = b = 0
    c0, t0 = _busy_cpu_s(), time.perf_counter()
    for batch in batches():
        n += len(batch)
        b += 1
    return {"images": n, "batches": b, "seconds": time.perf_counter() - t0, "cpu_s": _busy_cpu_s() - c0}


def stream_rate(ds: ShardDataset, cfg: StreamConfig) -> dict:
    stream = PlateStream(ds, cfg)
    warm = StreamConfig.for_evaluation(None, None, cfg.shape.batch_size, plates=cfg.plates[:1])
    next(iter(PlateStream(ds, warm).host_epoch(0)))  # start Ray Data's workers before the clock
    return _timed(lambda: (batch for batch, _ in stream.host_epoch(0)))


def pyarrow_rate(ds: ShardDataset, cfg: StreamConfig, threads: int) -> dict:
    stream = PlainPlateStream(ds, cfg, read_threads=threads)
    return _timed(lambda: (batch for batch, _ in stream.host_epoch(0)))


def dataloader_rate(ds: ShardDataset, cfg: StreamConfig, workers: int) -> dict:
    loader, sampler = plate_loader(PlainPlateStream(ds, cfg), workers)
    try:
        everything = list(sampler.indices)
        sampler.indices = everything[:workers]  # warm-up: start every worker, one plate each
        for _ in loader:
            pass
        sampler.indices = everything
        return _timed(lambda: (b for plate_batches in loader for b in plate_batches))
    finally:
        close_loader(loader)


def limit_rate(ds: ShardDataset, cfg: StreamConfig, share: tuple[int, int] = (0, 1)) -> dict:
    """One core: read_table without threads, then to_batch on consecutive slices of batch_size labelled rows;
    `share` (i, n) takes every n-th part from the i-th."""
    m = ds.manifest
    domains = DomainIndex.from_manifest(m)
    parts = [p for plate in cfg.plates for p in m.parts_of(plate)][share[0]::share[1]]
    labelled = pc.field("label") >= 0
    size = cfg.shape.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        n = 0
        for part in parts:
            table = pq.read_table(join(ds.root, part.path), filesystem=ds.fs, use_threads=False).filter(labelled)
            for start in range(0, table.num_rows, size):
                rows = table.slice(start, size)
                n += len(to_batch(RowBatch(queries=rows, controls=None, plate=part.plate), m, domains))
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"images": n, "seconds": seconds}


def limit_all_cores(ds: ShardDataset, cfg: StreamConfig, processes: int, repeats: int) -> dict:
    """The limit in `processes` processes at once, each on its share of the parts, best of `repeats` after a
    round that warms the processes and the page cache; each round's wall time runs from the first share handed
    out to the last done."""
    shares = [(i, processes) for i in range(processes)]
    rounds = []
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(1 + repeats):
            t0 = time.perf_counter()
            done = list(pool.map(limit_rate, [ds] * processes, [cfg] * processes, shares))
            rounds.append({"images": sum(r["images"] for r in done), "seconds": time.perf_counter() - t0})
    return _best(rounds[1:])


def part_costs(ds: ShardDataset, cfg: StreamConfig, sample: int = 16) -> dict:
    """What one part costs on one core, mean over the first `sample` parts (read once beforehand, so all come
    from the page cache): fetching and decoding it, its SHA-256, and its copy into Ray's object store."""
    import ray

    parts = [p for plate in cfg.plates for p in ds.manifest.parts_of(plate)][:sample]
    steps = {"read": 0.0, "checksum": 0.0, "object_store": 0.0}
    nbytes = 0
    for part in parts:
        ds.fs.cat_file(join(ds.root, part.path))
    for part in parts:
        t0 = time.perf_counter()
        data = ds.fs.cat_file(join(ds.root, part.path))
        table = pq.read_table(pa.BufferReader(data), use_threads=False)
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        ref = ray.put(table)
        t3 = time.perf_counter()
        del ref
        nbytes += table.nbytes
        for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2)):
            steps[step] += seconds
    return {"part_mb": nbytes / len(parts) / 2**20,
            **{f"part_{step}_ms": 1000 * seconds / len(parts) for step, seconds in steps.items()}}


def training_rate(steps: int = 12, batch_size: int = 32, size: int = 32, threads: int = 1) -> float:
    from platebench.methods import Batch, TaskSpec, get_method

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        method = get_method("erm")(TaskSpec(num_classes=8, channels=5, image_size=(size, size)), {}, DEFAULT_BACKBONE)
        batch = Batch(torch.randn(batch_size, 5, size, size), torch.randint(0, 8, (batch_size,)),
                      torch.zeros(batch_size, dtype=torch.bool))
        for _ in range(3):
            method.training_step(batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            method.training_step(batch)
        return steps * batch_size / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _best(runs: list[dict]) -> dict:
    counts = {(r["images"], r.get("batches")) for r in runs}
    if len(counts) != 1:
        raise RuntimeError(f"repeated measurements delivered different images/batches: {sorted(counts)}")
    return min(runs, key=lambda r: r["seconds"])


def run(ds: ShardDataset, batch_size: int = 64, parallelism: int = 2, limit_parts: int | None = None,
        repeats: int = 2) -> dict:
    cfg = stream_config(ds, batch_size, parallelism, limit_parts)
    runs: dict[str, list[dict]] = {"pyarrow": [], "stream": [], "dataloader": [], "limit": []}
    for _ in range(repeats):  # interleaved, best of each: the box is shared and noisy
        runs["pyarrow"].append(pyarrow_rate(ds, cfg, parallelism))
        runs["stream"].append(stream_rate(ds, cfg))
        runs["dataloader"].append(dataloader_rate(ds, cfg, parallelism))
        runs["limit"].append(limit_rate(ds, cfg))
    best = {k: _best(v) for k, v in runs.items()}
    cores = min(os.cpu_count() or 1, parallelism + 1)  # read tasks + the process that converts
    all_cores = limit_all_cores(ds, cfg, cores, repeats)
    if all_cores["images"] != best["limit"]["images"]:
        raise RuntimeError(f"the limit on {cores} cores converted {all_cores['images']} images, on one core "
                           f"{best['limit']['images']}")
    delivered = {k: (best[k]["images"], best[k]["batches"]) for k in ("pyarrow", "stream", "dataloader")}
    if len(set(delivered.values())) != 1:
        raise RuntimeError(f"the paths delivered different (images, batches): {delivered}")
    if best["limit"]["images"] != best["stream"]["images"]:
        raise RuntimeError(f"the limit converted {best['limit']['images']} images, the stream "
                           f"{best['stream']['images']}")
    ips = {k: v["images"] / v["seconds"] for k, v in best.items()}
    mb = ds.manifest.image_nbytes / 2**20
    per_core = ips["stream"] / cores
    all_cores_ips = all_cores["images"] / all_cores["seconds"]
    train_ips = training_rate()
    cpu_ms = {k: 1000 * best[k]["cpu_s"] / best[k]["images"] for k in ("stream", "pyarrow")}
    busy = {k: best[k]["cpu_s"] / (best[k]["seconds"] * (os.cpu_count() or 1)) for k in ("stream", "pyarrow")}
    return {"ratio": ips["stream"] / ips["pyarrow"], "stream_images_per_s": ips["stream"],
            "stream_mb_per_s": ips["stream"] * mb, "pyarrow_images_per_s": ips["pyarrow"],
            "pyarrow_mb_per_s": ips["pyarrow"] * mb, "dataloader_images_per_s": ips["dataloader"],
            "stream_vs_dataloader": ips["stream"] / ips["dataloader"],
            "limit_images_per_s_per_core": ips["limit"], "stream_images_per_s_per_core": per_core,
            "stream_cores": cores, "stream_fraction_of_limit": per_core / ips["limit"],
            "quickstart_train_images_per_s": train_ips, "stream_vs_train": ips["stream"] / train_ips,
            "stream_cpu_ms_per_image": cpu_ms["stream"], "pyarrow_cpu_ms_per_image": cpu_ms["pyarrow"],
            "stream_cpu_vs_pyarrow": cpu_ms["stream"] / cpu_ms["pyarrow"], "stream_busy_fraction": busy["stream"],
            "pyarrow_busy_fraction": busy["pyarrow"], "limit_all_cores_images_per_s": all_cores_ips,
            "limit_core_scaling": all_cores_ips / (cores * ips["limit"]), **part_costs(ds, cfg),
            "images": best["stream"]["images"], "batches": best["stream"]["batches"], "plates": len(cfg.plates),
            "batch_size": batch_size, "parallelism": parallelism,
            "image_shape": "x".join(map(str, ds.manifest.image_shape)), "dataset": ds.url}
