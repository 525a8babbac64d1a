"""What every raw-layout adapter shares: the plan, the adapter record, config checking, bad-item handling.

An adapter turns a raw layout (RxRx1 PNGs, JUMP TIFFs + load_data) into
  1. a plan (`IngestPlan`): the plates, each with what to read, plus the manifest pieces (classes,
     negative control, split schemes as predicates, provenance) — built on the driver, pure data;
  2. `load_plate(plan, plate, skipped) -> pyarrow.Table` in the shard schema (`shards.make_table`),
     run once per plate, in parallel, by `platebench.harness.prepare.ingest`.
Nothing here knows Ray: a plan is picklable and JSON-able, and parallel work during planning goes
through a `pmap` callable the harness passes in (builtin `map` works).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import DatasetError
from .manifest import Manifest, Part, SplitScheme
from .storage import StorageOptions

# Bumped when an adapter's output for the same input changes, so resumed ingests rewrite old plates.
INGEST_VERSION = 1


@dataclass
class IngestPlan:
    """Everything needed to write a dataset: per-plate work items plus the manifest pieces."""

    adapter: str
    name: str
    version: str
    channels: list[str]
    height: int
    width: int
    dtype: str
    classes: list[str]
    negative_control: dict
    split_schemes: dict[str, SplitScheme]
    plates: list[dict]  # each: {"plate", "source", "batch", "cell_type", **adapter fields}
    settings: dict = field(default_factory=dict)  # what load_plate needs besides the plate (JSON-able)
    extra_columns: dict[str, str] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # items dropped while planning (--skip-bad only)
    src_options: StorageOptions | None = None

    @property
    def image_nbytes(self) -> int:
        import numpy as np

        return len(self.channels) * self.height * self.width * np.dtype(self.dtype).itemsize

    def shared(self) -> IngestPlan:
        """The plan without its plate list: what every plate task needs (small to ship)."""
        return replace(self, plates=[], skipped=[])

    def fingerprint(self, plate: Mapping, skip_bad: bool) -> str:
        """Content id of one plate's output: if it matches a written plate's, the plate is not rewritten."""
        payload = {"v": INGEST_VERSION, "adapter": self.adapter, "channels": self.channels, "h": self.height,
                   "w": self.width, "dtype": self.dtype, "settings": self.settings, "plate": plate,
                   "skip_bad": bool(skip_bad), "extra": self.extra_columns}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def manifest(self, parts: list[Part], rows_plates: Iterable[str]) -> Manifest:
        """The manifest over the plates that were written (a plate whose every item was skipped has no parts)."""
        written = set(rows_plates)
        plates = {p["plate"]: {"source": p["source"], "batch": p["batch"], "cell_type": p["cell_type"]}
                  for p in self.plates if p["plate"] in written}
        return Manifest(
            name=self.name, version=self.version, channels=list(self.channels), height=self.height,
            width=self.width, dtype=self.dtype, classes=list(self.classes), negative_control=self.negative_control,
            split_schemes=self.split_schemes, plates=plates,
            parts=sorted(parts, key=lambda p: p.path), provenance=self.provenance,
            extra_columns=dict(self.extra_columns))


@dataclass(frozen=True)
class Adapter:
    """One raw layout. `defaults` lists every config key the adapter accepts (unknown keys are errors)."""

    name: str
    description: str
    defaults: Mapping[str, Any]
    plan_fn: Callable[..., IngestPlan]
    load_fn: Callable[..., Any]

    def config(self, config: Mapping[str, Any]) -> dict:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise DatasetError(f"ingest {self.name}: unknown option(s) {unknown} (known: {sorted(self.defaults)})")
        out = {**self.defaults, **{k: v for k, v in config.items() if v is not None}}
        if not out.get("src"):
            raise DatasetError(f"ingest {self.name}: option 'src' (the raw dataset location) is required")
        return out

    def plan(self, config: Mapping[str, Any], *, src_options: StorageOptions | None = None, skip_bad: bool = False,
             pmap: Callable = map) -> IngestPlan:
        """Build the plan. `pmap(fn, items)` may run planning work in parallel (order preserved)."""
        return self.plan_fn(self.config(config), src_options=src_options, skip_bad=skip_bad, pmap=pmap)

    def load_plate(self, plan: IngestPlan, plate: Mapping, skipped: list | None = None):
        """One plate as a shard-schema table. `skipped` None = strict (a bad item raises DatasetError
        naming the file); a list = --skip-bad (bad items are appended to it and left out)."""
        return self.load_fn(plan, plate, skipped)


class BadItems:
    """Strict by default: a bad item raises. With a list (--skip-bad) it is recorded and skipped instead."""

    def __init__(self, skipped: list | None, plate: str | None = None):
        self.skipped = skipped
        self.plate = plate

    @property
    def strict(self) -> bool:
        return self.skipped is None

    def bad(self, item: str, file: str, reason: str) -> None:
        if self.skipped is None:
            raise DatasetError(f"{file}: {reason} (item {item}; pass --skip-bad to skip bad items and list them "
                               f"in skipped.json)")
        self.skipped.append({"item": item, "plate": self.plate, "file": file, "reason": reason})


def check_choice(value: Any, allowed: Iterable, what: str) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise DatasetError(f"{what}: {value!r} is not one of {allowed}")
    return value


def contiguous_classes(ids: Iterable[int], where: str) -> int:
    """Number of classes K, after checking that every id 0..K-1 occurs (WILDS asserts the same)."""
    present = sorted(set(int(i) for i in ids))
    if not present:
        raise DatasetError(f"{where}: no labels found")
    if present[0] < 0:
        raise DatasetError(f"{where}: negative label id {present[0]}")
    k = present[-1] + 1
    if len(present) != k:
        missing = sorted(set(range(k)) - set(present))
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise DatasetError(f"{where}: label ids must be contiguous 0..{k - 1}; {len(missing)} missing: {shown}")
    return k


def class_names(pairs: Iterable[tuple[int, str]], k: int, where: str) -> list[str]:
    """classes[i] = the one name of id i; an id named two ways is an error."""
    names: dict[int, str] = {}
    for i, name in pairs:
        if names.setdefault(int(i), name) != name:
            raise DatasetError(f"{where}: label id {i} is named both {names[int(i)]!r} and {name!r}")
    return [names.get(i, str(i)) for i in range(k)]


def with_batches(pred: dict, batches: Iterable[str]) -> dict:
    """`pred` AND batch in {...}: same rows when `batches` holds every batch with a matching row, but the
    batch term lets readers skip whole plates (manifest.plates_for prunes on plate-level columns)."""
    return {"all": [{"column": "batch", "in": sorted(set(batches))}, pred]}


def scheme(description: str, splits: dict, selection_split: str, rule: str) -> SplitScheme:
    return SplitScheme(description=description, splits=splits, selection_split=selection_split, selection_rule=rule)
