"""A Ray Data datasource over the parts of a plate-shard dataset: read tasks of consecutive parts, a block per part.

Why not `ray.data.read_parquet`: on every dataset creation it samples files with one-CPU Ray tasks
(`_fetch_file_infos`), which cannot be scheduled while Train workers hold the CPUs (a deadlock with
two concurrent runs on a small box), and it may split or merge files into blocks. Here the manifest
already knows every part's rows and size, each read task runs platebench's validating reader (schema,
row count, image byte length, and the sha256 of the bytes it fetched against the manifest), and storage
failures are retried with backoff inside the task, so what a task returns is a whole, valid part or an error:
never a partial, damaged or duplicated one. Each row carries its part's index in the read (`PART_INDEX`, one
constant column per part), and `whole_parts` puts the parts back together from Ray Data's blocks: Ray Data
may cut a large block (over 1.5 times its target block size) or, for a task that returns several tables, join
them, so a block is not always a part; the stream still gets whole parts, in plan order, each with the rows the
manifest lists, whatever the machine's load.

A read task reads a run of consecutive parts (`read_runs`: up to `READ_TASK_BYTES`, and at least as many tasks as
read slots) and yields each part as it is read, one block per part (`block_target`): Ray Data costs tens of
milliseconds per task on top of the read itself (scheduling, and its executor noticing finished tasks in steps of
0.1 s), as much as reading a 12 MB part, so one task per part left the readers idle more than half the time. A
task carries a handle that knows only its own parts (`ShardDataset.reader`): the whole manifest would be pickled
into every task by the driver and parsed again in every worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from platebench.datasets.errors import DatasetError, StorageError
from platebench.datasets.manifest import Part
from platebench.datasets.shards import ShardDataset
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..errors import HarnessError

PART_INDEX = "_part_index"  # the stream drops it before anything else sees the block
READ_TASK_BYTES = 256 * 2**20  # images one read task reads (in memory): amortises Ray Data's per-task cost


def read_runs(sizes: Sequence[int], slots: int, budget: int = READ_TASK_BYTES) -> list[range]:
    """Consecutive runs of parts, one per read task, given each part's size in bytes: each run at most `budget`
    bytes (a part larger than that is a run of its own) and at most 1/`slots` of the read, so that `slots`
    concurrent tasks all have work."""
    target = min(budget, math.ceil(sum(sizes) / max(1, slots)))
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > target:
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    if sizes:
        runs.append(range(start, len(sizes)))
    return runs


def block_target(sizes: Sequence[int]) -> int:
    """Ray Data's target block size for a read of parts of these sizes (bytes): a block is emitted as soon as its
    buffer exceeds the target and cut only at 1.5 times it, so at 0.8 of the largest part every part at least that
    large leaves its task as soon as it is read, uncut (a smaller one may share a block with the next part, which
    `whole_parts` undoes). Without it a task's parts would be joined into one block delivered at the task's end."""
    return max(1, int(0.8 * max(sizes, default=1)))


class PlateShardDatasource(Datasource):
    def __init__(self, dataset: ShardDataset, parts: Sequence[Part], slots: int, retries: int = 3,
                 backoff_s: float = 1.0):
        super().__init__()
        self.dataset, self.parts = dataset, list(parts)
        self.slots, self.retries, self.backoff_s = slots, retries, backoff_s

    def part_bytes(self) -> list[int]:
        """Each part's images in memory (bytes), as the manifest knows them."""
        return [p.rows * self.dataset.manifest.image_nbytes for p in self.parts]

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.part_bytes())

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # Runs of whole parts regardless of `parallelism`: a part is never read twice or split between tasks.
        sizes = self.part_bytes()
        tasks = []
        for run in read_runs(sizes, self.slots):
            parts = self.parts[run.start:run.stop]
            meta = BlockMetadata(num_rows=sum(p.rows for p in parts), size_bytes=sum(sizes[i] for i in run),
                                 exec_stats=None, input_files=tuple(self.dataset.part_url(p) for p in parts))
            tasks.append(ReadTask(_ReadParts(self.dataset, parts, run.start, self.retries, self.backoff_s), meta))
        return tasks

    def get_name(self) -> str:
        return "PlateShards"


class _ReadParts:
    """A read task's work: its run of parts, each yielded as one table with its index in the read as soon as it is
    read. A module-level class, so that a task pickles as a reference plus a handle on its own parts (a closure is
    pickled by value)."""

    def __init__(self, dataset: ShardDataset, parts: Sequence[Part], first: int, retries: int, backoff_s: float):
        self.dataset, self.parts, self.first = dataset.reader(parts), list(parts), first
        self.retries, self.backoff_s = retries, backoff_s

    def __call__(self) -> Iterator[pa.Table]:
        for index, part in enumerate(self.parts, self.first):
            table = self.dataset.read_part(part, verify=True, retries=self.retries, backoff_s=self.backoff_s)
            yield table.append_column(PART_INDEX, pa.array([index] * table.num_rows, pa.int32()))


def whole_parts(blocks: Iterable[pa.Table], rows: Sequence[int], where: Callable[[int], str]) -> Iterator[pa.Table]:
    """The parts of a read, whole and in order (without their index column), from Ray Data's blocks however they
    were shaped. `rows[i]` is part i's row count in the manifest; `where(i)` names part i in errors."""
    expected, pieces, have = 0, [], 0
    for block in blocks:
        if not block.num_rows:
            continue
        index = block.column(PART_INDEX).to_numpy()
        starts = [0, *(np.flatnonzero(np.diff(index)) + 1).tolist()]
        for start, end in zip(starts, [*starts[1:], block.num_rows]):
            got = int(index[start])
            if expected >= len(rows) or got != expected:
                raise HarnessError(f"{where(min(expected, len(rows) - 1))}: Ray Data delivered part {got} of the read "
                                   f"in its place; the epoch's order would depend on timing")
            pieces.append(block.slice(start, end - start))
            have += end - start
            if have > rows[expected]:
                raise HarnessError(f"{where(expected)}: stream delivered {have} rows, manifest says {rows[expected]}")
            if have == rows[expected]:
                part = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
                yield part.drop_columns([PART_INDEX])
                expected, pieces, have = expected + 1, [], 0
    if expected < len(rows):
        raise HarnessError(f"{where(expected)}: stream delivered {have} rows, manifest says {rows[expected]}")


def plain_error(exc: BaseException) -> BaseException:
    """A read task's DatasetError or StorageError as the one line its reader wrote.

    Ray re-raises a task's error as a RayTaskError subclass of the original type (so `except DatasetError`
    still holds), but its text is the worker's traceback, and Ray Data appends retry advice to the cause's
    message: a run's failure would print all of it where one line naming the part is wanted.
    """
    from ray.exceptions import RayError

    cause = getattr(exc, "cause", None) if isinstance(exc, RayError) else None
    if not isinstance(cause, (DatasetError, StorageError)):
        return exc
    return type(cause)((str(cause).splitlines() or [type(cause).__name__])[0])
