"""The baselines the perf commands measure Ray against: the same shards, re-batching and conversion, no Ray.

`PlainPlateStream` is the harness's `PlateStream` with one change: parts are read with plain pyarrow
(`ShardDataset.read_part`, each part's sha256 verified as the stream verifies it) by a thread pool instead of
Ray Data read tasks. Planning, plate order, masks, the `Rebatcher` (plate-pure, several plates per step, mixed)
and `batching.to_batch` are the stream's own, so both deliver the same batches and the difference in time is
what Ray Data costs.

`PlateDataset` is what a user would write with PyTorch alone: a map-style `torch.utils.data.Dataset`
whose item i is every batch of plate i (read with pyarrow, re-batched and made host batches as above), served
by a `DataLoader` with worker processes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import torch

from ..data.rebatch import Rebatcher
from ..data.stream import PlateStream
from ..train.evaluate import Evaluator


class PlainPlateStream(PlateStream):
    """A `PlateStream` whose parts come from a pyarrow thread pool (see the module docstring)."""

    read_threads: int = 4

    def __init__(self, *args, read_threads: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_threads = read_threads

    @classmethod
    def adopt(cls, stream: PlateStream, read_threads: int) -> PlainPlateStream:
        """Turn a built stream into a plain one in place: its planning state is kept (not re-read), only
        where its blocks come from changes."""
        stream.__class__ = cls
        stream.read_threads = read_threads
        return stream

    def read_parts(self, parts: list) -> Iterator[pa.Table]:
        """One block per part, in order, read with pyarrow by `read_threads` threads."""
        if not parts:
            return
        # At most this many parts in flight or waiting, like the stream's prefetch window.
        window = max(self.read_threads, self.config.prefetch_blocks)
        pool = ThreadPoolExecutor(max_workers=self.read_threads)
        pending: deque = deque()
        todo = iter(parts)
        try:
            for part in todo:
                pending.append(pool.submit(self.ds.read_part, part, verify=True, retries=self.config.read_retries))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class PlainEvaluator(Evaluator):
    """The run's `Evaluator` (same splits, batch sizes, controls, counts and rows) reading through plain streams."""

    def __init__(self, *args, read_threads: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_threads = read_threads

    def stream(self, split: str, batch_size: int | None = None, n_controls: int | None = None) -> PlateStream:
        stream = super().stream(split, batch_size, n_controls)
        if not isinstance(stream, PlainPlateStream):
            PlainPlateStream.adopt(stream, self.read_threads)
        return stream


class PlateDataset(torch.utils.data.Dataset):
    """Item i = the host batches (uint8 images) of plate i, in the order `stream` would deliver them (one epoch,
    `epoch`).

    The stream only lends its plan, part order, masks and conversion; it never reads here."""

    def __init__(self, stream: PlateStream, epoch: int = 0):
        self.stream, self.epoch = stream, epoch
        self.plates = [p for p, _ in stream.plan(epoch)[0]]

    def __len__(self) -> int:
        return len(self.plates)

    def __getitem__(self, i: int) -> list:
        s, plate = self.stream, self.plates[i]
        if s.config.shape.plates_per_step != 1 or not s.config.shape.plate_pure:
            raise ValueError("PlateDataset serves plate-pure batches of one plate per step")
        rb = Rebatcher(s.config.rebatch_spec(self.epoch))
        for part in s.parts([plate], self.epoch):
            block = s.ds.read_part(part, verify=True, retries=s.config.read_retries)
            qmask, cmask = s.masks(block)
            rb.push(block, qmask, cmask)
        rb.finish()
        return [s.host(item) for item in rb.pop()]


def keep_as_is(item):
    """DataLoader collate function: an item is already a list of batches (module-level: workers pickle it)."""
    return item


class Indices(torch.utils.data.Sampler):
    """A sampler whose indices can change between epochs of a DataLoader with persistent workers (the
    sampler lives in the main process), so a warm-up epoch can touch a few plates only."""

    def __init__(self, indices: list[int]):
        self.indices = list(indices)

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


def plate_loader(stream: PlateStream, workers: int, epoch: int = 0) -> tuple[torch.utils.data.DataLoader, Indices]:
    """A DataLoader over `PlateDataset(stream)` with `workers` persistent worker processes (spawned: the
    driver may run Ray, whose threads a fork would copy) and its mutable sampler."""
    dataset = PlateDataset(stream, epoch)
    sampler = Indices(range(len(dataset)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                         collate_fn=keep_as_is, persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers > 0 else None)
    return loader, sampler


def close_loader(loader: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent workers now rather than at garbage collection."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None
