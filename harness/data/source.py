"""A Ray Data datasource over the parts of a plate-shard dataset: one block per part, read by tasks that each read a
run of consecutive parts (`read_groups`).

Why not `ray.data.read_parquet`: on every dataset creation it samples files with one-CPU Ray tasks
(`_fetch_file_infos`), which cannot be scheduled while Train workers hold the CPUs (a deadlock with
two concurrent runs on a small box), and it may split or merge files into blocks. Here the manifest
already knows every part's rows and size, each read task runs platebench's validating reader (schema,
row count, image byte length, and the sha256 of the bytes it fetched against the manifest), and storage
failures are retried with backoff inside the task, so a block is either a whole, valid part or an error:
never a partial, damaged or duplicated one. Each block carries its part's index in the read (`PART_INDEX`, one
constant column) so the stream can check that blocks arrive in plan order whatever the machine's load.

Why several parts per task: Ray Data's executor collects finished work in steps of up to 0.1 s (it waits for
all its running tasks, or 0.1 s), so a task that reads one part in a few tens of milliseconds leaves its slot
idle for the rest of the step: one 12 MB part per task delivered 4,330 images/s where two pyarrow threads read
the same parts at 14,927. A task yields its parts' blocks one by one as it reads them, so memory in flight is
still a few parts, and the run of parts a task reads is short enough that every slot gets work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa
from platebench.datasets.errors import DatasetError, StorageError
from platebench.datasets.manifest import Part
from platebench.datasets.shards import ShardDataset
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

PART_INDEX = "_part_index"  # the stream drops it before anything else sees the block


def read_groups(part_bytes: Sequence[int], task_bytes: int, min_tasks: int) -> list[range]:
    """Consecutive runs of part indices, one per read task, in order and covering every part once: runs of about
    `task_bytes` of images, but at least `min_tasks` runs (when there are that many parts) so that every slot
    has work and the last tasks finish together; one part is never split."""
    n = len(part_bytes)
    if n == 0:
        return []
    tasks = min(n, max(math.ceil(sum(part_bytes) / max(1, task_bytes)), min_tasks, 1))
    # Cut at the byte quantiles: runs of near-equal size even when parts differ (a plate's last part is short);
    # cut early only when each remaining part must start a run of its own.
    total, bounds, acc = sum(part_bytes), [0], 0
    for i in range(1, n):
        if len(bounds) == tasks:
            break
        acc += part_bytes[i - 1]
        if acc * tasks >= total * len(bounds) or n - i == tasks - len(bounds):
            bounds.append(i)
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class PlateShardDatasource(Datasource):
    def __init__(self, dataset: ShardDataset, parts: Sequence[Part], retries: int = 3, backoff_s: float = 1.0,
                 task_bytes: int = 256 * 2**20, min_tasks: int = 1):
        super().__init__()
        self.dataset, self.parts = dataset, list(parts)
        self.retries, self.backoff_s = retries, backoff_s
        self.task_bytes, self.min_tasks = task_bytes, min_tasks

    def estimate_inmemory_data_size(self) -> int:
        return sum(p.rows for p in self.parts) * self.dataset.manifest.image_nbytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # Runs of parts regardless of `parallelism`, one block per part: blocks must never mix plates.
        nbytes = self.dataset.manifest.image_nbytes
        tasks = []
        for run in read_groups([p.rows * nbytes for p in self.parts], self.task_bytes, self.min_tasks):
            mine = [(i, self.parts[i]) for i in run]
            rows = sum(p.rows for _, p in mine)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * nbytes,
                                 exec_stats=None, input_files=tuple(self.dataset.part_url(p) for _, p in mine))
            tasks.append(ReadTask(_reader(self.dataset, mine, self.retries, self.backoff_s), meta))
        return tasks

    def get_name(self) -> str:
        return "PlateShards"


def _reader(dataset: ShardDataset, parts: list[tuple[int, Part]], retries: int, backoff_s: float):
    def read():
        for index, part in parts:  # a generator: each block leaves the task as soon as its part is read
            table = dataset.read_part(part, verify=True, retries=retries, backoff_s=backoff_s)
            yield table.append_column(PART_INDEX, pa.array([index] * table.num_rows, pa.int32()))

    return read


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
