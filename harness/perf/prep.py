"""The device-side image work's cost: seconds per image of a stream's `ImagePrep` (float conversion,
standardisation, augmentation) on the training device, for `perf train` and `perf gpu`.

Timed over the first batches of an epoch already copied to the device (the copy is the stream's, not timed
here), synchronising CUDA before reading the clock, so the figure is the device's work alone.
"""

from __future__ import annotations

import time

import torch

from ..data.stream import PlateStream, to_device


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prep_seconds_per_image(stream: PlateStream, device, epoch: int = 0, max_batches: int = 16) -> float:
    """Seconds per image of `stream.finish` on `device` over up to `max_batches` batches of `epoch` (one untimed
    batch first: allocator and kernel warm-up)."""
    staged = []
    for host, seed in stream.host_epoch(epoch):
        staged.append((to_device(host, device), seed))
        if len(staged) > max_batches:
            break
    if len(staged) < 2:
        raise ValueError("prep_seconds_per_image: the epoch has fewer than 2 batches")
    stream.finish(*staged[0])
    _sync(device)
    t0 = time.perf_counter()
    images = 0
    for batch, seed in staged[1:]:
        out = stream.finish(batch, seed)
        images += sum(len(b) for b in out) if isinstance(out, list) else len(out)
    _sync(device)
    return (time.perf_counter() - t0) / images
