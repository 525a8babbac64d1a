"""Rows of a batch (Arrow) → `platebench.methods.Batch` (torch), in two halves.

On the host (`to_batch`, the stream's CPU work): the image bytes as a tensor of their stored dtype (uint8),
labels, controls and domain ids; in pinned memory when the batch is bound for a CUDA device. On the training
device (`ImagePrep`): float32, per-channel standardisation, the seeded augmentation policy. Sending uint8
sends a quarter of float32's bytes, and the float work runs as batched tensor ops where the compute is.
On a CPU device the same code runs: the numbers are those of converting on the host (the same ops in the
same order on the same values).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    """`method` on `device` with its conv weights in MEMORY_FORMAT (matching the batches ImagePrep makes)."""
    return method.to(device=device, memory_format=MEMORY_FORMAT)


def pins_for(device) -> bool:
    """Whether host batches bound for `device` go to pinned memory (CUDA: asynchronous copies)."""
    return torch.device(device).type == "cuda"


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


def _images(arrays: list[np.ndarray], pin: bool) -> torch.Tensor:
    """One tensor of the stored dtype holding `arrays` one after the other: a single copy out of the Arrow
    buffers (which are read-only), into pinned memory when `pin`."""
    n = sum(a.shape[0] for a in arrays)
    dtype = torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
    out = torch.empty((n, *arrays[0].shape[1:]), dtype=dtype, pin_memory=pin)
    view, start = out.numpy(), 0
    for a in arrays:
        view[start:start + a.shape[0]] = a
        start += a.shape[0]
    return out


def to_batch(item: RowBatch, manifest: Manifest, domains: DomainIndex, keep_ids: bool = False,
             pin: bool = False) -> Batch:
    """A host batch: images [B, C, H, W] in the stored dtype (queries, then the appended controls), labels (-1 for
    controls), control flags and domain ids; `ImagePrep` finishes it on the device."""
    tables = [item.queries] + ([item.controls] if item.controls is not None else [])
    n_q = item.queries.num_rows
    n_c = item.controls.num_rows if item.controls is not None else 0
    # Chunk by chunk (a batch spanning two parts has two): joining the chunks first would copy every image twice.
    x = _images([decode_images(chunk, manifest.image_shape, manifest.dtype)
                 for t in tables for chunk in (t.column("image").chunks or [t.column("image").combine_chunks()])],
                pin)
    labels = np.concatenate([item.queries.column("label").to_numpy(), np.full(n_c, -1, np.int64)])
    plates = pa.concat_arrays([t.column("plate").combine_chunks() for t in tables]).to_pylist()
    ids = item.queries.column("image_id").to_pylist() if keep_ids else None
    meta = dict(domains.plate_meta[item.plate]) if item.plate else {}
    return Batch(images=x, labels=torch.from_numpy(labels.astype(np.int64)),
                 is_control=torch.cat([torch.zeros(n_q, dtype=torch.bool), torch.ones(n_c, dtype=torch.bool)]),
                 domains=domains.rows(plates), plate=item.plate, meta=meta, image_ids=ids)


@dataclass(frozen=True)
class ImagePrep:
    """The images' work on the training device: stored dtype → float32, standardised per channel with
    `channel_stats` (per-channel mean, std) or, when None, with each image's own statistics, then augmented
    with `policy` (its random draws come from a CPU generator, so every device draws the same numbers)."""

    channel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    policy: str | None = None

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = batch.images.float()
        if self.channel_stats is None:
            x = self_standardize(x)
        else:
            mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                         for v in self.channel_stats)
            x = (x - mean) / std
        if self.policy and generator is not None:
            x = augment(x, self.policy, generator)
        return replace(batch, images=x.contiguous(memory_format=MEMORY_FORMAT))
