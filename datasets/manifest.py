"""`manifest.json`: the description of a plate-shard dataset (ARCHITECTURE.md, "The shard format").

The manifest is strict: unknown keys, missing fields, and split predicates over columns that do not
exist are errors naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import predicates
from .errors import DatasetError

FORMAT = "platebench-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# The fixed columns of every part, in order. `image` holds raw C*H*W bytes of the manifest dtype.
BASE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("batch", pa.string()),
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.int32()),
        ("cell_type", pa.string()),
        ("perturbation", pa.string()),
        ("label", pa.int64()),
        ("is_control", pa.bool_()),
        ("image", pa.binary()),
    ]
)
METADATA_COLUMNS = [f.name for f in BASE_SCHEMA if f.name != "image"]
# Columns that are constant within a plate; predicates over these prune whole plates without reading them.
PLATE_COLUMNS = ("source", "batch", "plate", "cell_type")
DOMAIN_KINDS = ("plate", "batch", "source", "cell_type")
DTYPES = ("uint8", "uint16", "float16", "float32")
EXTRA_TYPES = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "bool": pa.bool_(),
               "float64": pa.float64()}
SPLIT_ROLES = ("train", "val", "test")


@dataclass
class Part:
    path: str  # relative to the dataset root
    plate: str
    rows: int
    controls: int
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Part:
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected an object, got {d!r}")
        _exact_keys(d, {"path", "plate", "rows", "controls", "sha256", "bytes"}, where)
        for key in ("path", "plate", "sha256"):
            if not isinstance(d[key], str) or not d[key]:
                raise DatasetError(f"{where}.{key}: expected a non-empty string, got {d[key]!r}")
        for key in ("rows", "controls", "bytes"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise DatasetError(f"{where}.{key}: expected a non-negative integer, got {d[key]!r}")
        if d["controls"] > d["rows"]:
            raise DatasetError(f"{where}.controls: {d['controls']} exceeds the part's rows ({d['rows']})")
        return cls(**d)


@dataclass
class SplitScheme:
    description: str
    splits: dict[str, Any]  # split name -> predicate
    selection_split: str  # the split model selection may read (shares no row with a test split: checked at load)
    selection_rule: str  # e.g. "training-domain-validation" or "official-ood-validation"

    def role(self, split: str) -> str:
        if split == "train":
            return "train"
        if split == self.selection_split:
            return "val"
        return "test"

    @classmethod
    def from_dict(cls, d: dict, where: str) -> SplitScheme:
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected an object, got {d!r}")
        _exact_keys(d, {"description", "splits", "selection_split", "selection_rule"}, where)
        if not isinstance(d["splits"], dict) or "train" not in d["splits"]:
            raise DatasetError(f"{where}.splits: must be an object with at least a 'train' split")
        if d["selection_split"] not in d["splits"]:
            raise DatasetError(f"{where}.selection_split: {d['selection_split']!r} is not one of its splits")
        return cls(**d)


@dataclass
class Manifest:
    name: str
    version: str
    channels: list[str]
    height: int
    width: int
    dtype: str
    classes: list[str]
    negative_control: dict  # {"description": str, "column": str, "values": [..]}
    split_schemes: dict[str, SplitScheme]
    plates: dict[str, dict]  # plate -> {"source", "batch", "cell_type"}
    parts: list[Part]
    provenance: dict = field(default_factory=dict)
    extra_columns: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # ---- derived -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (len(self.channels), self.height, self.width)

    @property
    def image_nbytes(self) -> int:
        return int(np.prod(self.image_shape)) * np.dtype(self.dtype).itemsize

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def schema(self) -> pa.Schema:
        schema = BASE_SCHEMA
        for name, typ in self.extra_columns.items():
            schema = schema.append(pa.field(name, EXTRA_TYPES[typ]))
        return schema

    def columns(self) -> set[str]:
        return set(self.schema().names) - {"image"}

    def scheme(self, name: str) -> SplitScheme:
        if name not in self.split_schemes:
            raise DatasetError(
                f"split scheme {name!r} is not in the manifest (schemes: {sorted(self.split_schemes)})"
            )
        return self.split_schemes[name]

    def parts_of(self, plate: str) -> list[Part]:
        return [p for p in self.parts if p.plate == plate]

    def checksum(self) -> str:
        """A content id of the dataset: sha256 over the sorted part checksums and the manifest's splits."""
        import hashlib

        h = hashlib.sha256()
        for p in sorted(self.parts, key=lambda p: p.path):
            h.update(f"{p.path}:{p.sha256}\n".encode())
        h.update(json.dumps({k: asdict(v) for k, v in self.split_schemes.items()}, sort_keys=True).encode())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = [asdict(p) for p in self.parts]
        d["split_schemes"] = {k: asdict(v) for k, v in self.split_schemes.items()}
        order = ["format", "format_version", "name", "version", "channels", "height", "width", "dtype",
                 "classes", "negative_control", "extra_columns", "split_schemes", "plates", "parts", "provenance"]
        return {k: d[k] for k in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise DatasetError(f"{where}: field 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{where}: unknown format_version {d.get('format_version')!r} (this platebench reads {FORMAT_VERSION})"
            )
        required = {"name", "version", "channels", "height", "width", "dtype", "classes", "negative_control",
                    "split_schemes", "plates", "parts"}
        _exact_keys(d, required | {"format", "format_version", "provenance", "extra_columns"}, where,
                    required=required)
        if d["dtype"] not in DTYPES:
            raise DatasetError(f"{where}: field 'dtype' is {d['dtype']!r}, expected one of {DTYPES}")
        for key in ("height", "width"):
            if not isinstance(d[key], int) or d[key] <= 0:
                raise DatasetError(f"{where}: field {key!r} must be a positive integer, got {d[key]!r}")
        if not d["channels"] or not all(isinstance(c, str) for c in d["channels"]):
            raise DatasetError(f"{where}: field 'channels' must be a non-empty list of names")
        extra = d.get("extra_columns") or {}
        for name, typ in extra.items():
            if name in BASE_SCHEMA.names or typ not in EXTRA_TYPES:
                raise DatasetError(f"{where}: extra_columns.{name}: bad column name or type {typ!r}")
        for key, typ in (("parts", list), ("split_schemes", dict), ("plates", dict), ("classes", list)):
            if not isinstance(d[key], typ):
                raise DatasetError(f"{where}: field {key!r} must be a JSON {typ.__name__.replace('dict', 'object')}, "
                                   f"got {type(d[key]).__name__}")
        parts = [Part.from_dict(p, f"{where}: parts[{i}]") for i, p in enumerate(d["parts"])]
        schemes = {k: SplitScheme.from_dict(v, f"{where}: split_schemes.{k}") for k, v in d["split_schemes"].items()}
        m = cls(
            name=d["name"], version=str(d["version"]), channels=list(d["channels"]), height=d["height"],
            width=d["width"], dtype=d["dtype"], classes=list(d["classes"]), negative_control=d["negative_control"],
            split_schemes=schemes, plates=d["plates"], parts=parts, provenance=d.get("provenance") or {},
            extra_columns=dict(extra),
        )
        m.validate(where)
        return m

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    def validate(self, where: str = MANIFEST_NAME) -> None:
        cols = self.columns()
        for sname, scheme in self.split_schemes.items():
            for split, pred in scheme.splits.items():
                predicates.check(pred, f"{where}: split_schemes.{sname}.splits.{split}", cols)
        nc = self.negative_control
        if not isinstance(nc, dict) or set(nc) - {"description", "column", "values"}:
            raise DatasetError(f"{where}: negative_control must have description/column/values")
        seen = set()
        for p in self.parts:
            if p.path in seen:
                raise DatasetError(f"{where}: part {p.path} is listed twice")
            seen.add(p.path)
            if p.plate not in self.plates:
                raise DatasetError(f"{where}: part {p.path} belongs to plate {p.plate!r}, missing from 'plates'")
        for plate, meta in self.plates.items():
            missing = {"source", "batch", "cell_type"} - set(meta)
            if missing:
                raise DatasetError(f"{where}: plates.{plate}: missing {sorted(missing)}")
        for sname in self.split_schemes:
            self.selection_overlaps(sname, where)

    def selection_overlaps(self, sname: str, where: str = MANIFEST_NAME) -> dict[str, list[str]]:
        """Model selection must never read a test row: per test split of scheme `sname`, the plates on which
        only the rows can tell whether a row is in both it and the selection split (ShardDataset reads those
        rows when it opens the dataset). Raises DatasetError when the predicates and the plates' columns
        alone prove a shared row; a test split the manifest proves disjoint is left out."""
        scheme = self.split_schemes[sname]
        sel = scheme.selection_split
        finite = {f.name: frozenset((True, False)) for f in self.schema() if pa.types.is_boolean(f.type)}
        rows: dict[str, int] = {}
        for p in self.parts:
            rows[p.plate] = rows.get(p.plate, 0) + p.rows
        out: dict[str, list[str]] = {}
        for split, pred in scheme.splits.items():
            if split == sel or scheme.role(split) != "test":
                continue
            # First without any plate: disjoint `in` sets over a plate-level column settle it at once.
            if predicates.overlap(scheme.splits[sel], pred, finite=finite) is False:
                continue
            plates = [plate for plate in self.plates if rows.get(plate)]
            known = [{"plate": plate, **{c: self.plates[plate][c] for c in PLATE_COLUMNS if c in self.plates[plate]}}
                     for plate in plates]
            undecided = []
            for plate, both in zip(plates, predicates.overlaps(scheme.splits[sel], pred, known, finite)):
                if both:
                    raise DatasetError(
                        f"{where}: split_schemes.{sname}: selection split {sel!r} and test split {split!r} both "
                        f"select every row of plate {plate!r}; model selection must never read a test row")
                if both is None:
                    undecided.append(plate)
            if undecided:
                out[split] = undecided
        return out

    # ---- planning helpers -----------------------------------------------------------------
    def plates_for(self, scheme: str, split: str) -> list[str]:
        """Plates that may hold rows of a split (pruned by plate-level predicate terms)."""
        pred = self.scheme(scheme).splits.get(split)
        if pred is None:
            raise DatasetError(
                f"split {split!r} is not in scheme {scheme!r} (splits: {sorted(self.scheme(scheme).splits)})"
            )
        return [plate for plate, meta in self.plates.items()
                if _maybe(pred, {"plate": plate, **meta})]


def _maybe(pred: Any, plate_row: dict) -> bool:
    """True unless the plate-level columns alone prove no row of this plate can match."""
    if pred is True:
        return True
    if "column" in pred:
        if pred["column"] not in PLATE_COLUMNS:
            return True
        return predicates.evaluate_row(pred, plate_row)
    if "all" in pred:
        return all(_maybe(p, plate_row) for p in pred["all"])
    if "any" in pred:
        return any(_maybe(p, plate_row) for p in pred["any"])
    inner = pred["not"]
    if predicates.columns_of(inner) <= set(PLATE_COLUMNS):
        return not predicates.evaluate_row(inner, plate_row)
    return True


def _exact_keys(d: dict, allowed: set[str], where: str, required: set[str] | None = None) -> None:
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: expected an object")
    unknown = set(d) - allowed
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}")
    missing = (allowed if required is None else required) - set(d)
    if missing:
        raise DatasetError(f"{where}: missing field(s) {sorted(missing)}")
