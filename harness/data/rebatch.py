"""Turn a stream of single-plate Arrow blocks into mini-batches (Python and pyarrow; no Ray, no tensors).

Why a re-batcher: Ray Data's own batching mixes plates or gives ragged batches, and its groupby/sort
are all-to-all barriers that wait for the whole dataset. Blocks here are whole parts (one plate each), arriving in
plan order; we buffer at most the rows of the plates currently open.

Three modes, each with a step count that `count_steps` predicts exactly from the per-plate row
counts, so every DDP rank can agree on the number of steps of an epoch without communicating:
- plate-pure (eval and train): batches of B rows of one plate; a plate's last partial batch is kept
  when it has at least `min_last` rows (eval: always), else dropped;
- several plates per step: groups of G plate-pure batches from G distinct plates;
- mixed: a shuffle buffer over consecutive plates emits batches of B rows drawn across plates.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from platebench.methods.base import BatchShape


@dataclass(frozen=True)
class RebatchSpec:
    shape: BatchShape  # batch size (0: whole plate), plate-pure or mixed, plates per step, controls per batch
    train: bool
    control_pool: int = 256  # at most this many controls kept per plate (reservoir)
    mixed_buffer_plates: int = 4
    seed: int = 0
    epoch: int = 0

    @property
    def min_last(self) -> int:
        size = self.shape.batch_size
        if not self.train or size == 0:
            return 1
        return max(2, size // 2)


def plate_batch_count(n_rows: int, spec: RebatchSpec) -> int:
    """Number of plate-pure batches a plate with `n_rows` query rows yields."""
    if n_rows <= 0:
        return 0
    if spec.shape.batch_size == 0:
        return 1
    full, rest = divmod(n_rows, spec.shape.batch_size)
    return full + (1 if rest >= spec.min_last else 0)


def _group_steps(batch_counts: Sequence[tuple[str, int]], g: int) -> list[list[str]]:
    """Greedy grouping shared by count_steps and the live re-batcher: a step is emitted as soon as g
    distinct plates have a ready batch, taking one batch from each of the g plates with most ready
    batches (earliest arrival breaks ties). Plates arrive one after another, all their batches at once
    (a simulation of arrival; the live stream calls `_GroupState` with the same events)."""
    state = _GroupState(g)
    steps = []
    for plate, n in batch_counts:
        for _ in range(n):
            state.add(plate, None)
            steps.extend(state.drain())
    return [[p for p, _ in step] for step in steps]


class _GroupState:
    def __init__(self, g: int):
        self.g = g
        self.ready: OrderedDict[str, list] = OrderedDict()

    def add(self, plate: str, item) -> None:
        self.ready.setdefault(plate, []).append(item)

    def drain(self) -> list[list[tuple[str, object]]]:
        out = []
        while len(self.ready) >= self.g:
            order = sorted(enumerate(self.ready.items()), key=lambda e: (-len(e[1][1]), e[0]))
            chosen = [plate for _, (plate, _) in order[: self.g]]
            step = []
            for plate in chosen:
                step.append((plate, self.ready[plate].pop(0)))
                if not self.ready[plate]:
                    del self.ready[plate]
            out.append(step)
        return out


def count_steps(plate_rows: Sequence[tuple[str, int]], spec: RebatchSpec) -> int:
    """Exact number of items the re-batcher yields for plates arriving in this order."""
    shape = spec.shape
    if not shape.plate_pure:
        return sum(n for _, n in plate_rows) // shape.batch_size
    counts = [(p, plate_batch_count(n, spec)) for p, n in plate_rows]
    if shape.plates_per_step == 1:
        return sum(n for _, n in counts)
    return len(_group_steps(counts, shape.plates_per_step))


def _rng(spec: RebatchSpec, *keys) -> np.random.Generator:
    # Seeded per (seed, epoch, plate, ...): the order never depends on timing, parallelism or the
    # process (crc32, not Python's salted hash, turns names into numbers).
    material = [spec.seed, spec.epoch] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(material)


@dataclass
class RowBatch:
    """Rows of one batch before tensor conversion: query rows and (optional) control-context rows."""

    queries: pa.Table
    controls: pa.Table | None
    plate: str | None


class Rebatcher:
    """Feed single-plate blocks with `push(block, query_mask)`; read batches from `pop()`."""

    def __init__(self, spec: RebatchSpec):
        self.spec, self.shape = spec, spec.shape
        self._plate: str | None = None
        self._carry: pa.Table | None = None
        self._emitted = 0  # batches emitted for the current plate
        self._controls: pa.Table | None = None
        self._controls_seen = 0
        self._group = _GroupState(spec.shape.plates_per_step)
        self._mixed: list[pa.Table] = []
        self._mixed_plates: list[str] = []
        self._mixed_rng = _rng(spec, "mixed")
        self._out: list = []

    # -- input ------------------------------------------------------------------------------
    def push(self, block: pa.Table, query_mask: np.ndarray, is_control: np.ndarray) -> None:
        plates = set(block.column("plate").unique().to_pylist()) if block.num_rows else set()
        if len(plates) > 1:
            raise ValueError(f"re-batcher: a block holds several plates {sorted(plates)}; one part = one plate")
        if not plates:
            return
        plate = plates.pop()
        if plate != self._plate:
            self._finish_plate()
            self._plate, self._carry, self._emitted = plate, None, 0
            self._controls, self._controls_seen = None, 0
        if self.shape.n_controls and is_control.any():
            self._add_controls(block.filter(pa.array(is_control)))
        if not query_mask.any():
            return
        rows = block if query_mask.all() else block.filter(pa.array(query_mask))  # filter copies every image
        if not self.shape.plate_pure:
            self._push_mixed(plate, rows)
            return
        if self.spec.train:  # shuffle within the part; parts of a plate arrive in a seeded order
            rows = rows.take(pa.array(_rng(self.spec, plate, self._emitted, rows.num_rows)
                                      .permutation(rows.num_rows)))
        if self._carry is not None:
            rows = pa.concat_tables([self._carry, rows])
            self._carry = None
        b = self.shape.batch_size
        if b == 0:
            self._carry = rows
            return
        start = 0
        while rows.num_rows - start >= b:
            self._emit_plate_batch(rows.slice(start, b))
            start += b
        self._carry = rows.slice(start) if start < rows.num_rows else None

    def finish(self) -> None:
        """End of the epoch's stream: flush the open plate and whatever the mode allows."""
        self._finish_plate()
        if not self.shape.plate_pure:
            self._drain_mixed(final=True)
        # leftover groups with fewer than G distinct plates are dropped (count_steps agrees)

    # -- output -----------------------------------------------------------------------------
    def pop(self) -> list:
        out, self._out = self._out, []
        return out

    # -- internals --------------------------------------------------------------------------
    def _finish_plate(self) -> None:
        if self._plate is None or not self.shape.plate_pure:
            return
        if self._carry is not None and self._carry.num_rows >= self.spec.min_last:
            self._emit_plate_batch(self._carry)
        self._carry = None

    def _add_controls(self, rows: pa.Table) -> None:
        # Reservoir sampling (algorithm R) keeps a uniform sample of at most control_pool controls of the
        # plate, so a plate with thousands of controls (JUMP DMSO wells) costs bounded memory.
        cap = self.spec.control_pool
        rng = _rng(self.spec, self._plate or "", 7, self._controls_seen)
        kept = 0 if self._controls is None else self._controls.num_rows
        slots: list[tuple[int, int]] = [(0, i) for i in range(kept)]
        for i in range(rows.num_rows):
            self._controls_seen += 1
            if len(slots) < cap:
                slots.append((1, i))
            else:
                j = int(rng.integers(0, self._controls_seen))
                if j < cap:
                    slots[j] = (1, i)
        sources = [self._controls, rows]
        # combine_chunks copies the kept rows, so the blocks they came from can be freed
        self._controls = pa.concat_tables([sources[s].slice(i, 1) for s, i in slots]).combine_chunks()

    def _sample_controls(self) -> pa.Table | None:
        if not self.shape.n_controls:
            return None
        pool = self._controls
        if pool is None or pool.num_rows == 0:
            raise ValueError(f"plate {self._plate}: the method needs negative controls as context, "
                             f"but this plate has none")
        rng = _rng(self.spec, self._plate or "", 11, self._emitted)
        m = self.shape.n_controls
        idx = rng.choice(pool.num_rows, size=m, replace=pool.num_rows < m)
        return pool.take(pa.array(idx))

    def _emit_plate_batch(self, rows: pa.Table) -> None:
        item = RowBatch(queries=rows, controls=self._sample_controls(), plate=self._plate)
        self._emitted += 1
        if self.shape.plates_per_step == 1:
            self._out.append(item)
            return
        self._group.add(self._plate, item)
        for step in self._group.drain():
            self._out.append([it for _, it in step])

    def _push_mixed(self, plate: str, rows: pa.Table) -> None:
        self._mixed.append(rows)
        if plate not in self._mixed_plates:
            self._mixed_plates.append(plate)
        self._drain_mixed(final=False)

    def _drain_mixed(self, final: bool) -> None:
        b = self.shape.batch_size
        if not self._mixed:
            return
        if not final and len(self._mixed_plates) < self.spec.mixed_buffer_plates:
            return
        pool = pa.concat_tables(self._mixed).combine_chunks()
        order = self._mixed_rng.permutation(pool.num_rows)
        # Keep a full buffer's worth mixing with the next plates; at the end emit every full batch.
        keep = 0 if final else pool.num_rows // max(1, len(self._mixed_plates))
        n_emit = (pool.num_rows - keep) // b
        for k in range(n_emit):
            self._out.append(RowBatch(queries=pool.take(pa.array(order[k * b:(k + 1) * b])), controls=None,
                                      plate=None))
        rest = order[n_emit * b:]
        self._mixed = [pool.take(pa.array(rest))] if len(rest) else []
        self._mixed_plates = self._mixed_plates[-1:] if len(rest) and not final else []

