"""Builders for small shard datasets used across tests (independent of the synthetic generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from platebench.datasets.manifest import Manifest, SplitScheme
from platebench.datasets.shards import make_table, write_manifest, write_plate

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def build_tiny_dataset(root: Path | str, plates_per_batch: int = 2, batches=("b1", "b2", "b3"),
                       images_per_plate: int = 24, controls_per_plate: int = 4, size: int = 8,
                       num_classes: int = 3, seed: int = 0, part_rows: int | None = None, options=None) -> str:
    """Random images; labels cycle over classes; batch b3 is from source s2. Returns the root as str."""
    rng = np.random.default_rng(seed)
    root = str(root)
    parts, plates = [], {}
    nbytes = len(CHANNELS) * size * size
    for b in batches:
        source = "s2" if b == batches[-1] else "s1"
        for k in range(plates_per_batch):
            plate = f"{b}p{k}"
            n = images_per_plate
            imgs = rng.integers(0, 256, (n, len(CHANNELS), size, size), dtype=np.uint8)
            is_ctrl = [i % (n // controls_per_plate) == 0 for i in range(n)] if controls_per_plate else [False] * n
            labels = [-1 if c else i % num_classes for i, c in enumerate(is_ctrl)]
            meta = dict(
                image_id=[f"{plate}_{i:03d}" for i in range(n)], source=[source] * n, batch=[b] * n,
                plate=[plate] * n, well=[f"W{i // 2:02d}" for i in range(n)], site=[1 + i % 2 for i in range(n)],
                cell_type=["U2OS" if k % 2 == 0 else "HEPG2"] * n,
                perturbation=["DMSO" if c else f"cpd{lab}" for c, lab in zip(is_ctrl, labels)],
                label=labels, is_control=is_ctrl,
            )
            parts += write_plate(root, plate, make_table(meta, imgs), image_nbytes=nbytes, options=options,
                                 target_part_bytes=(part_rows or n) * nbytes)
            plates[plate] = {"source": source, "batch": b, "cell_type": meta["cell_type"][0]}
    train_batches = list(batches[:-2]) if len(batches) > 2 else list(batches[:1])
    manifest = Manifest(
        name="tiny", version="1", channels=CHANNELS, height=size, width=size, dtype="uint8",
        classes=[f"cpd{i}" for i in range(num_classes)],
        negative_control={"description": "DMSO wells", "column": "perturbation", "values": ["DMSO"]},
        split_schemes={
            "new_batches": SplitScheme(
                description="train on b1 site 1; val = b2; id_test = b1 site 2; test = b3",
                splits={
                    "train": {"all": [{"column": "batch", "in": train_batches}, {"column": "site", "eq": 1}]},
                    "val": {"column": "batch", "eq": batches[-2]},
                    "id_test": {"all": [{"column": "batch", "in": train_batches}, {"column": "site", "eq": 2}]},
                    "test": {"column": "batch", "eq": batches[-1]},
                },
                selection_split="val", selection_rule="training-domain-validation"),
        },
        plates=plates, parts=parts, provenance={"builder": "tests/shard_fixtures.py", "seed": seed},
    )
    write_manifest(root, manifest, options)
    return root
