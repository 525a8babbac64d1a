"""Rows of a batch (Arrow) → `platebench.methods.Batch` (torch): decode, standardise, augment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from platebench.datasets.manifest import DOMAIN_KINDS, Manifest
from platebench.datasets.shards import decode_images
from platebench.methods import Batch

from .augment import augment, self_standardize
from .rebatch import RowBatch

# Images and conv weights in NHWC: on CPU the conv kernels run 12-20% faster per training step and
# per evaluation batch than in NCHW for the quickstart model (one thread, 24 px, batch 32-64), and
# NHWC is what cuDNN prefers too. Logical shapes are unchanged, so methods never see the difference.
MEMORY_FORMAT = torch.channels_last


def on_device(method, device):
    """`method` on `device` with its conv weights in MEMORY_FORMAT (matching the batches of to_batch)."""
    return method.to(device=device, memory_format=MEMORY_FORMAT)


@dataclass(frozen=True)
class DomainIndex:
    """Integer ids of every plate/batch/source/cell type in the manifest (stable: sorted names)."""

    ids: dict[str, dict[str, int]]
    plate_meta: dict[str, dict[str, str]]

    @classmethod
    def from_manifest(cls, m: Manifest) -> DomainIndex:
        meta = {p: {"plate": p, **{k: str(v) for k, v in d.items()}} for p, d in m.plates.items()}
        ids = {kind: {name: i for i, name in enumerate(sorted({d[kind] for d in meta.values()}))}
               for kind in DOMAIN_KINDS}
        return cls(ids=ids, plate_meta=meta)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.ids.items()}

    def rows(self, plates: list[str]) -> dict[str, torch.Tensor]:
        return {kind: torch.tensor([self.ids[kind][self.plate_meta[p][kind]] for p in plates], dtype=torch.long)
                for kind in DOMAIN_KINDS}


def to_batch(item: RowBatch, manifest: Manifest, domains: DomainIndex, policy: str | None = None,
             generator: torch.Generator | None = None, keep_ids: bool = False,
             channel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Batch:
    """`channel_stats` (per-channel mean, std): normalise every image with them; None: self-standardise."""
    tables = [item.queries] + ([item.controls] if item.controls is not None else [])
    n_q = item.queries.num_rows
    n_c = item.controls.num_rows if item.controls is not None else 0
    arrays = [decode_images(t.column("image"), manifest.image_shape, manifest.dtype) for t in tables]
    arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    x = torch.from_numpy(arr.astype(np.float32))
    if channel_stats is None:
        x = self_standardize(x)
    else:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in channel_stats)
        x = (x - mean) / std
    if policy and generator is not None:
        x = augment(x, policy, generator)
    x = x.contiguous(memory_format=MEMORY_FORMAT)
    labels = np.concatenate([item.queries.column("label").to_numpy(), np.full(n_c, -1, np.int64)])
    plates = pa.concat_arrays([t.column("plate").combine_chunks() for t in tables]).to_pylist()
    ids = item.queries.column("image_id").to_pylist() if keep_ids else None
    meta = dict(domains.plate_meta[item.plate]) if item.plate else {}
    return Batch(images=x, labels=torch.from_numpy(labels.astype(np.int64)),
                 is_control=torch.cat([torch.zeros(n_q, dtype=torch.bool), torch.ones(n_c, dtype=torch.bool)]),
                 domains=domains.rows(plates), plate=item.plate, meta=meta, image_ids=ids)
