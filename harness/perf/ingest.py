"""Ingestion throughput (images/s): the Ray Data job parallel over plates vs one local process.

Without `--src`, a raw RxRx1-layout tree (metadata.csv + one 8-bit PNG per channel and site) is
generated first, so the command measures decode + stack + write on this machine. With `--src`, the
real layout is read (e.g. a local copy of RxRx1, or the s3:// archive on a cluster).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np

from ..ingest_job import run_ingest

COLUMNS = ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type", "sirna",
           "sirna_id"]


def make_rxrx1_layout(root: Path, experiments: int = 3, size: int = 128, seed: int = 0) -> int:
    """A format-faithful RxRx1 tree (B3/B4 of datasets-research.md) with random pixels. Returns images.

    Each experiment follows the real design: its 4 plates hold the 1,108 treatment siRNAs once (277 per
    plate), plus the 30 positive controls and the negative control on every plate (308 wells), 2 sites
    each. The last experiment is the test experiment.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    wells = [f"{chr(ord('B') + i // 22)}{i % 22 + 2:02d}" for i in range(308)]
    rows = []
    for e in range(experiments):
        exp = f"HUVEC-{e + 1:02d}"
        for plate in range(1, 5):
            ids = list(range((plate - 1) * 277, plate * 277)) + list(range(1108, 1139))
            for well, sid in zip(wells, ids):
                kind = "negative_control" if sid == 1138 else "positive_control" if sid >= 1108 else "treatment"
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


def run(src: str | None = None, layout: str = "rxrx1", experiments: int = 3, size: int = 128,
        parallelism: int | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pb-perf-ingest-"))
    if src is None:
        if layout != "rxrx1":
            raise ValueError("without --src, perf ingest generates an rxrx1 layout only")
        src = str(work / "raw")
        Path(src).mkdir()
        make_rxrx1_layout(Path(src), experiments=experiments, size=size)
    config = {"src": src, "resize": None, "crop": None, "version": "perf"}
    local = run_ingest(layout, config, str(work / "local"), executor="local", progress=False)
    # Twice, fresh outputs: the first Ray Data job also pays its workers' one-time start-up.
    cold = run_ingest(layout, config, str(work / "ray-1"), executor="ray", parallelism=parallelism, progress=False)
    warm = run_ingest(layout, config, str(work / "ray-2"), executor="ray", parallelism=parallelism, progress=False)
    return {"ratio": warm["images_per_s"] / local["images_per_s"], "ray_images_per_s": warm["images_per_s"],
            "ray_cold_images_per_s": cold["images_per_s"], "local_images_per_s": local["images_per_s"],
            "images": warm["images"], "layout": layout, "src": src, "ray_seconds": warm["seconds"],
            "local_seconds": local["seconds"]}
