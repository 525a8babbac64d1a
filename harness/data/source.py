"""A Ray Data datasource over the parts of a plate-shard dataset: one read task = one part = one block.

Why not `ray.data.read_parquet`: on every dataset creation it samples files with one-CPU Ray tasks
(`_fetch_file_infos`), which cannot be scheduled while Train workers hold the CPUs (a deadlock with
two concurrent runs on a small box), and it may split or merge files into blocks. Here the manifest
already knows every part's rows and size, each read task runs platebench's validating reader (schema,
row count, image byte length, and the sha256 of the bytes it fetched against the manifest), and storage
failures are retried with backoff inside the task, so a block is either a whole, valid part or an error:
never a partial, damaged or duplicated one. Each block carries its part's index in the read (`PART_INDEX`, one
constant column) so the stream can check that blocks arrive in plan order whatever the machine's load.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from platebench.datasets.errors import DatasetError, StorageError
from platebench.datasets.manifest import Part
from platebench.datasets.shards import ShardDataset
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

PART_INDEX = "_part_index"  # the stream drops it before anything else sees the block


class PlateShardDatasource(Datasource):
    def __init__(self, dataset: ShardDataset, parts: Sequence[Part], retries: int = 3, backoff_s: float = 1.0):
        super().__init__()
        self.dataset, self.parts = dataset, list(parts)
        self.retries, self.backoff_s = retries, backoff_s

    def estimate_inmemory_data_size(self) -> int:
        return sum(p.rows for p in self.parts) * self.dataset.manifest.image_nbytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # One task per part regardless of `parallelism`: blocks must never mix plates.
        nbytes = self.dataset.manifest.image_nbytes
        tasks = []
        for index, part in enumerate(self.parts):
            meta = BlockMetadata(num_rows=part.rows, size_bytes=part.rows * nbytes, exec_stats=None,
                                 input_files=(self.dataset.part_url(part),))
            tasks.append(ReadTask(_reader(self.dataset, part, index, self.retries, self.backoff_s), meta))
        return tasks

    def get_name(self) -> str:
        return "PlateShards"


def _reader(dataset: ShardDataset, part: Part, index: int, retries: int, backoff_s: float):
    def read():
        table = dataset.read_part(part, verify=True, retries=retries, backoff_s=backoff_s)
        return [table.append_column(PART_INDEX, pa.array([index] * table.num_rows, pa.int32()))]

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
