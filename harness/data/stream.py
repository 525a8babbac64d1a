"""Plate-grouped streaming of a split from plate shards (local disk or S3) with Ray Data.

Per epoch, each rank gets its own set of plates (seeded shuffle + balanced assignment), reads the parts
it does not hold in memory yet with Ray Data (`PlateShardDatasource`: read tasks of consecutive parts, each part
verified against its checksum and delivered as soon as it is read; whole parts in plan order whatever order the
reads finish in or however Ray Data shapes its blocks, so an epoch's batches are a function of (spec, epoch, rank)
alone) and turns parts into batches with the re-batcher: uint8 images on the host, made float, standardised and
augmented on the training device (harness/data/batching.py). The number of steps per
epoch is computed from the manifest and split counts alone, identical on every rank, so DDP ranks
never wait on a rank that ran dry (a rank whose stream ends early would leave the others waiting in an
all-reduce).

Why one Ray Data dataset per rank and epoch instead of Train's `streaming_split`: the split
equalises rows, not plate-pure batches, and cannot keep plates disjoint across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from platebench.datasets.shards import ShardDataset
from platebench.methods.base import BatchShape, DataRequest

from ..errors import HarnessError
from .augment import check_policy
from .batching import DomainIndex, ImagePrep, pins_for, to_batch
from .rebatch import Rebatcher, RebatchSpec, count_steps, plate_batch_count


@dataclass(frozen=True)
class StreamConfig:
    """What one stream reads and how it batches. Built from a method's request by `for_training`, and for
    evaluation by `for_evaluation`; tests and benchmarks may build one directly."""

    scheme: str | None  # None (with split None): every labelled image of the dataset
    split: str | None
    shape: BatchShape  # batch size (0: whole plate, evaluation only), plate-pure or mixed, plates, controls
    train: bool
    seed: int = 0
    augment: str | None = None  # policy name, training only
    read_cpus: float = 0.25  # per read task (Launch.read_cpus): leaves CPU beside the Train workers for the reads
    prefetch_blocks: int = 4
    read_retries: int = 3  # per part, exponential backoff from 1 s (storage outages)
    read_concurrency: int | None = None  # cap on concurrent read tasks (None: Ray Data decides)
    plates: tuple[str, ...] | None = None  # restrict to these plates (benchmarks, debugging)
    keep_ids: bool = False
    channel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: self-standardised images

    @classmethod
    def for_training(cls, request: DataRequest, scheme: str, seed: int, augment: str | None = None,
                     read_cpus: float | None = None, channel_stats=None) -> StreamConfig:
        """The training stream a method's DataRequest asks for (the one place a request becomes a stream)."""
        return cls(scheme=scheme, split="train", shape=request.training_shape(), train=True, seed=seed,
                   augment=augment, read_cpus=cls.read_cpus if read_cpus is None else read_cpus,
                   channel_stats=channel_stats)

    @classmethod
    def for_evaluation(cls, scheme: str | None, split: str | None, batch_size: int, n_controls: int = 0, *,
                       seed: int = 0, channel_stats=None, plates: tuple[str, ...] | None = None,
                       read_concurrency: int | None = None, keep_ids: bool = False) -> StreamConfig:
        """An evaluation stream (the one place evaluation settings become a stream): plate-pure batches of
        `batch_size` rows (0: the whole plate), each with `n_controls` of its plate's controls appended, in plan
        order, unshuffled and unaugmented. `scheme` and `split` None: every labelled image (of `plates`)."""
        return cls(scheme=scheme, split=split, shape=BatchShape(batch_size, n_controls=n_controls), train=False,
                   seed=seed, channel_stats=channel_stats, plates=plates, read_concurrency=read_concurrency,
                   keep_ids=keep_ids)

    def rebatch_spec(self, epoch: int) -> RebatchSpec:
        return RebatchSpec(shape=self.shape, train=self.train, seed=self.seed, epoch=epoch)


class PartCache:
    """Parts kept in a worker's memory across epochs and streams, up to `max_bytes` (0: off).

    Each Ray Data execution costs ~1 s of task scheduling for small shards, and a run reads the same
    parts every epoch (training, then every evaluation split; id_test shares the training plates), so
    a worker keeps what fits. Larger datasets simply stream every epoch.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._parts: dict[str, pa.Table] = {}

    def get(self, key: str) -> pa.Table | None:
        return self._parts.get(key)

    def put(self, key: str, table: pa.Table) -> None:
        size = table.nbytes
        if key in self._parts or self.bytes + size > self.max_bytes:
            return
        self._parts[key] = table
        self.bytes += size


def assign_plates(plate_rows: list[tuple[str, int]], world: int, spec: RebatchSpec) -> list[list[tuple[str, int]]]:
    """Greedy balanced assignment by number of batches (ties → lowest rank); keeps input order per rank."""
    load = [0] * world
    out: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    for plate, n in plate_rows:
        r = int(np.argmin(load))
        out[r].append((plate, n))
        load[r] += plate_batch_count(n, spec) if spec.shape.plate_pure else n
    return out


class PlateStream:
    """Iterate one split of a dataset as batches for one rank of `world`."""

    def __init__(self, dataset: ShardDataset, config: StreamConfig, rank: int = 0, world: int = 1,
                 cache: PartCache | None = None):
        size = config.shape.batch_size
        if size < 0 or (size == 0 and config.train):
            mode = "training" if config.train else "evaluation"
            raise HarnessError(f"batch size {size} is not valid for {mode}")
        if config.augment:
            check_policy(config.augment)
        if config.shape.n_controls and not any(p.controls for p in dataset.manifest.parts):
            raise HarnessError(f"{dataset.url}: the method needs negative controls as context, but the dataset "
                               f"has none (manifest parts list 0 controls)")
        self.ds, self.config, self.rank, self.world = dataset, config, rank, world
        self.manifest = dataset.manifest
        self.domains = DomainIndex.from_manifest(self.manifest)
        labelled = pc.field("label") >= 0
        if config.split is None:
            self.query_expr = labelled
            meta = dataset.metadata(list(config.plates) if config.plates else None)
        else:
            self.query_expr = dataset.split_expression(config.scheme, config.split) & labelled
            meta = dataset.split_metadata(config.scheme, config.split)
        self._pred_columns = sorted(set(self._expr_columns()) | {"label"})
        meta = meta.filter(labelled)
        if config.plates:
            meta = meta.filter(pc.field("plate").isin(list(config.plates)))
        counts = meta.group_by("plate").aggregate([("plate", "count")]).to_pylist()
        self.plate_rows = {r["plate"]: r["plate_count"] for r in counts}
        self.n_rows = sum(self.plate_rows.values())
        if not self.plate_rows:
            raise HarnessError(f"split {config.split!r} of scheme {config.scheme!r} has no labelled images")
        self.cache = cache if cache is not None else PartCache(0)
        self.prep = ImagePrep(config.channel_stats, config.augment if config.train else None)

    def _expr_columns(self) -> list[str]:
        from platebench.datasets import predicates

        if self.config.split is None:
            return []
        pred = self.manifest.scheme(self.config.scheme).splits[self.config.split]
        return sorted(predicates.columns_of(pred))

    # -- planning ---------------------------------------------------------------------------
    def plan(self, epoch: int) -> tuple[list[tuple[str, int]], int]:
        """(plates with their query counts in arrival order for this rank, number of steps)."""
        spec = self.config.rebatch_spec(epoch)
        plates = sorted(self.plate_rows.items())
        if self.config.train:
            order = np.random.default_rng([self.config.seed, epoch, 991]).permutation(len(plates))
            plates = [plates[i] for i in order]
        per_rank = assign_plates(plates, self.world, spec)
        steps = [count_steps(p, spec) for p in per_rank]
        mine = per_rank[self.rank]
        # Training: every rank takes the same number of steps (DDP all-reduces each step).
        return mine, (min(steps) if self.config.train else steps[self.rank])

    def steps(self, epoch: int) -> int:
        return self.plan(epoch)[1]

    def warm(self, epoch: int = 0) -> None:
        """Read this rank's parts of `epoch` into the part cache when it has room (a lane's start-up, timed
        as such), so that the epoch's time is training or evaluation, not the stream's first reads."""
        if self.cache.max_bytes <= 0:
            return
        plates, _ = self.plan(epoch)
        for _ in self.blocks([p for p, _ in plates], epoch):
            pass

    # -- reading ----------------------------------------------------------------------------
    def parts(self, plates: list[str], epoch: int) -> list:
        """The manifest parts of `plates` in the order the stream reads them in `epoch`: plate by plate, each
        plate's control-bearing parts first, then the rest (shuffled with the seed when training)."""
        parts = []
        for plate in plates:
            mine = self.manifest.parts_of(plate)
            # Control-bearing parts first (the writer puts controls first), then the rest in a seeded order.
            ctrl = [p for p in mine if p.controls]
            rest = [p for p in mine if not p.controls]
            if self.config.train and len(rest) > 1:
                rng = np.random.default_rng([self.config.seed, epoch, len(parts)])
                rest = [rest[i] for i in rng.permutation(len(rest))]
            parts += ctrl + rest
        return parts

    def blocks(self, plates: list[str], epoch: int) -> Iterator[pa.Table]:
        """This epoch's parts in plan order: from the part cache, else read with Ray Data."""
        parts = self.parts(plates, epoch)
        missing = [p for p in parts if self.cache.get(p.path) is None]
        fetched = self.read_parts(missing)
        try:
            for part in parts:
                cached = self.cache.get(part.path)
                if cached is not None:
                    yield cached
                    continue
                block = next(fetched)  # one block per part, in order (preserve_order)
                if block.num_rows != part.rows:
                    raise HarnessError(f"{self.ds.part_url(part)}: stream delivered {block.num_rows} rows, "
                                       f"manifest says {part.rows}")
                self.cache.put(part.path, block)
                yield block
        finally:
            fetched.close()

    def read_parts(self, parts: list) -> Iterator[pa.Table]:
        """Each part of `parts`, whole and in order, read by Ray Data tasks (no cache). The one source of blocks:
        a subclass that reads another way overrides it (perf.plain.PlainPlateStream)."""
        if not parts:
            return
        from platebench.datasets.errors import DatasetError, StorageError

        from .source import plain_error, whole_parts

        blocks = self.read_dataset(parts).iter_batches(batch_size=None, batch_format="pyarrow",
                                                       prefetch_batches=self.config.prefetch_blocks)
        try:
            yield from whole_parts(blocks, [p.rows for p in parts], lambda i: self.ds.part_url(parts[i]))
        except (DatasetError, StorageError) as exc:  # a damaged or unreachable part: one line, same type
            raise plain_error(exc) from None

    def read_dataset(self, parts: list):
        """The Ray Data dataset that reads `parts`: its blocks carry `PART_INDEX` (see source.py)."""
        import ray.data

        from .source import PlateShardDatasource, block_target

        ray.data.DataContext.get_current().enable_progress_bars = False
        # As many read tasks at once as asked, else as the cluster has CPUs (a task's CPU share is smaller so that
        # reads fit beside Train workers, but a read keeps a core busy).
        slots = self.config.read_concurrency or int(ray.cluster_resources().get("CPU", 1))
        source = PlateShardDatasource(self.ds, parts, slots, retries=self.config.read_retries)
        data = ray.data.read_datasource(source, override_num_blocks=len(parts), num_cpus=self.config.read_cpus,
                                        concurrency=self.config.read_concurrency)
        # Blocks in part order whatever order the parallel read tasks finish in (a busy machine reorders them):
        # Ray Data's own reordering, set on this dataset's copy of the context so no other job can turn it off.
        data.context.execution_options.preserve_order = True
        data.context.target_max_block_size = block_target(source.part_bytes())
        return data

    def masks(self, block: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `block` this stream batches: labelled and in the split; rows that are negative controls)."""
        n = block.num_rows
        small = block.select(self._pred_columns).append_column("_row", pa.array(np.arange(n)))
        rows = small.filter(self.query_expr).column("_row").to_numpy()
        qmask = np.zeros(n, dtype=bool)
        qmask[rows] = True
        return qmask, block.column("is_control").to_numpy(zero_copy_only=False)

    # -- iteration --------------------------------------------------------------------------
    def host_epoch(self, epoch: int = 0, pin: bool = False) -> Iterator[tuple]:
        """This rank's batches of `epoch` as the CPU delivers them: (a host batch, or a list of them when
        plates_per_step > 1; the seed of its augmentation). Images keep their stored dtype (batching.to_batch),
        in pinned memory when `pin`: this is all the stream's CPU work."""
        plates, steps = self.plan(epoch)
        if steps == 0:
            return
        rb = Rebatcher(self.config.rebatch_spec(epoch))
        done = 0
        blocks = self.blocks([p for p, _ in plates], epoch)
        try:
            for _ in self._with_end(blocks, rb):
                for item in rb.pop():
                    yield self.host(item, pin), ((self.config.seed * 1_000_003 + epoch) * 1_009 + self.rank) \
                        * 1_000_033 + done
                    done += 1
                    if done == steps:
                        return
        finally:
            if hasattr(blocks, "close"):
                blocks.close()
        if done != steps:
            raise HarnessError(f"stream produced {done} batches, planned {steps} (rank {self.rank}, epoch {epoch}); "
                               f"the dataset changed under the run or a read was incomplete")

    def epoch(self, epoch: int = 0, device: torch.device | str = "cpu") -> Iterator:
        """Batches (lists of batches when plates_per_step > 1) of this rank for `epoch`, finished on `device`.

        The next batch's copy to the device is issued before the current one is handed over, so on CUDA (pinned
        host memory, non-blocking copies) it overlaps the consumer's step; the float work then runs on the device.
        """
        staged = None
        for host, seed in self.host_epoch(epoch, pins_for(device)):
            ahead = (to_device(host, device), seed)
            if staged is not None:
                yield self.finish(*staged)
            staged = ahead
        if staged is not None:
            yield self.finish(*staged)

    def _with_end(self, blocks, rb: Rebatcher):
        for block in blocks:
            qmask, cmask = self.masks(block)
            rb.push(block, qmask, cmask)
            yield block
        rb.finish()
        yield None

    def host(self, item, pin: bool = False):
        """Re-batcher output (a RowBatch, or a list of them for several plates per step) as host batches."""
        if isinstance(item, list):
            return [to_batch(it, self.manifest, self.domains, self.config.keep_ids, pin) for it in item]
        return to_batch(item, self.manifest, self.domains, self.config.keep_ids, pin)

    def finish(self, batch, seed: int | None = None):
        """Host batches already moved to their device, finished by this stream's ImagePrep: float32, standardised,
        and, when training, augmented from a generator seeded with `seed` (shared by a step's plates in order)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        if isinstance(batch, list):
            return [self.prep(b, g) for b in batch]
        return self.prep(batch, g)

    def convert(self, item, device: torch.device | str = "cpu"):
        """One re-batcher item as a finished evaluation batch on `device` (unaugmented)."""
        return self.finish(to_device(self.host(item, pins_for(device)), device))


def to_device(batch, device):
    """A host batch (or a list of them) on `device`: images copied non-blocking (pinned memory on CUDA)."""
    return [b.to(device) for b in batch] if isinstance(batch, list) else batch.to(device)
