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


def make_rxrx1_layout(root: Path, plates: int = 8, wells_per_plate: int = 24, size: int = 128, seed: int = 0) -> int:
    """A format-faithful RxRx1 tree (B3/B4 of datasets-research.md) with random pixels. Returns images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(plates):
        exp, plate = f"HUVEC-{p // 4 + 1:02d}", p % 4 + 1
        for w in range(wells_per_plate):
            well = f"{chr(ord('B') + w // 22)}{w % 22 + 2:02d}"
            kind = "negative_control" if w == 0 else "treatment"
            sid = 1138 if kind == "negative_control" else w % 1108
            for site in (1, 2):
                rows.append({"site_id": f"{exp}_{plate}_{well}_{site}", "well_id": f"{exp}_{plate}_{well}",
                             "cell_type": "HUVEC", "dataset": "train" if p < plates - 4 else "test", "experiment": exp,
                             "plate": plate, "well": well, "site": site, "well_type": kind,
                             "sirna": "EMPTY" if kind == "negative_control" else f"s{sid:05d}", "sirna_id": sid})
                folder = root / "images" / exp / f"Plate{plate}"
                folder.mkdir(parents=True, exist_ok=True)
                for ch in range(1, 7):
                    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                        folder / f"{well}_s{site}_w{ch}.png", compress_level=1)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def run(src: str | None = None, layout: str = "rxrx1", plates: int = 8, size: int = 128,
        parallelism: int | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pb-perf-ingest-"))
    if src is None:
        if layout != "rxrx1":
            raise ValueError("without --src, perf ingest generates an rxrx1 layout only")
        src = str(work / "raw")
        Path(src).mkdir()
        make_rxrx1_layout(Path(src), plates=plates, size=size)
    config = {"src": src, "resize": None, "crop": None, "version": "perf"}
    local = run_ingest(layout, config, str(work / "local"), executor="local", progress=False)
    ray = run_ingest(layout, config, str(work / "ray"), executor="ray", parallelism=parallelism, progress=False)
    return {"ratio": ray["images_per_s"] / local["images_per_s"], "ray_images_per_s": ray["images_per_s"],
            "local_images_per_s": local["images_per_s"], "images": ray["images"], "layout": layout, "src": src,
            "ray_seconds": ray["seconds"], "local_seconds": local["seconds"]}
