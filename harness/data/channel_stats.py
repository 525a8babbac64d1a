"""Per-channel mean and standard deviation of a training split, for `normalize: dataset`.

Computed from the raw pixels of the split's labelled images and controls, plate by plate in the manifest's
order, up to `max_images` images (a few thousand pin each channel's mean and std far below the spread
between plates; a full pass over RxRx1 would cost an epoch). Deterministic: the same dataset and split give
the same numbers on every rank and after every resume, and the training stores them beside its weights.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from platebench.datasets.shards import ShardDataset, decode_images

from ..errors import HarnessError
from .stream import PartCache

MAX_IMAGES = 4096


def channel_stats(ds: ShardDataset, scheme: str, split: str, cache: PartCache | None = None,
                  max_images: int = MAX_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    expr = ds.split_expression(scheme, split)
    m = ds.manifest
    total = np.zeros(len(m.channels))
    squares = np.zeros(len(m.channels))
    pixels = 0
    for plate in m.plates_for(scheme, split):
        for part in m.parts_of(plate):
            table = cache.get(part.path) if cache is not None else None
            if table is None:
                table = ds.read_part(part, verify=True)  # the sha256 check the stream's reads make
            table = table.filter(expr & ((pc.field("label") >= 0) | pc.field("is_control")))
            if not table.num_rows:
                continue
            take = min(table.num_rows, max_images - pixels // (m.height * m.width))
            x = decode_images(table.column("image").slice(0, take), m.image_shape, m.dtype).astype(np.float64)
            total += x.sum(axis=(0, 2, 3))
            squares += (x ** 2).sum(axis=(0, 2, 3))
            pixels += take * m.height * m.width
            if pixels // (m.height * m.width) >= max_images:
                break
        if pixels // (m.height * m.width) >= max_images:
            break
    if not pixels:
        raise HarnessError(f"{ds.url}: split {split!r} of {scheme!r} has no images to compute channel statistics")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel is left centred, not divided by 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
