"""Write and read plate shards: `<root>/manifest.json` + `<root>/plates/<plate>/part-NNNNN.parquet`.

Writer rules: a part holds one plate; controls are written first within a plate (so a stream can
collect a plate's control context from its first part(s)); each file is written to a temporary key
and renamed; a plate's parts are recorded in `plates/<plate>/_plate.json` (used to resume ingestion);
the manifest is written last, atomically, and only after every part it lists exists.

Reader rules: refuse, naming the file and field, an unknown format version, a part whose schema,
row count or checksum differs from the manifest, and an image whose byte length is not C*H*W*itemsize.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import predicates
from .errors import DatasetError, StorageError
from .manifest import BASE_SCHEMA, MANIFEST_NAME, METADATA_COLUMNS, Manifest, Part
from .storage import STORAGE_ERRORS, StorageOptions, absolute, describe_error, filesystem, join, put_atomic

PLATE_MARKER = "_plate.json"
# (url, manifest checksum) of datasets whose selection/test disjointness needed, and passed, a read of the rows.
_SELECTION_CHECKED: set[tuple[str, str]] = set()
DEFAULT_PART_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------
# building tables
# ---------------------------------------------------------------------------------------------
def make_table(meta: Mapping[str, Sequence], images: np.ndarray, extra_columns: Mapping[str, str] | None = None
               ) -> pa.Table:
    """Build a part table from metadata columns and an image array [N, C, H, W] (any dtype)."""
    images = np.ascontiguousarray(images)
    n = images.shape[0]
    missing = [c for c in METADATA_COLUMNS if c not in meta]
    if missing:
        raise DatasetError(f"make_table: missing metadata column(s) {missing}")
    nbytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    flat = images.reshape(n, -1).view(np.uint8).reshape(-1)
    offsets = np.arange(0, (n + 1) * nbytes, nbytes, dtype=np.int32) if n else np.zeros(1, np.int32)
    image_col = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    arrays = []
    for f in BASE_SCHEMA:
        if f.name == "image":
            arrays.append(image_col)
        else:
            arrays.append(pa.array(list(meta[f.name]) if not isinstance(meta[f.name], np.ndarray)
                                   else meta[f.name], type=f.type))
    schema = BASE_SCHEMA
    from .manifest import EXTRA_TYPES

    for name, typ in (extra_columns or {}).items():
        schema = schema.append(pa.field(name, EXTRA_TYPES[typ]))
        arrays.append(pa.array(list(meta[name]), type=EXTRA_TYPES[typ]))
    for arr in arrays:
        if len(arr) != n:
            raise DatasetError(f"make_table: a column has {len(arr)} values for {n} images")
    return pa.Table.from_arrays(arrays, schema=schema)


def decode_images(column, shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    """Zero-copy view of a binary image column as [N, C, H, W] (a copy only if chunks must be joined)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros((0, *shape), dtype=dtype)
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset: arr.offset + n + 1]
    if not np.all(np.diff(offsets) == nbytes):
        bad = int(np.argmax(np.diff(offsets) != nbytes))
        raise DatasetError(f"image at row {bad} has {int(np.diff(offsets)[bad])} bytes, expected {nbytes} "
                           f"(C*H*W*itemsize for shape {shape} {dtype})")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=n * nbytes, offset=int(offsets[0]))
    return data.view(dtype).reshape(n, *shape)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _check_plate_name(plate: str) -> None:
    if not plate or "/" in plate or plate.startswith(".") or plate.startswith("_"):
        raise DatasetError(f"plate name {plate!r} cannot be used as a folder name")


def write_plate(root: str, plate: str, table: pa.Table, *, image_nbytes: int, options: StorageOptions | None = None,
                target_part_bytes: int = DEFAULT_PART_BYTES) -> list[Part]:
    """Write one plate's rows as parts (controls first), then its `_plate.json`. Returns the parts."""
    _check_plate_name(plate)
    if table.num_rows == 0:
        raise DatasetError(f"plate {plate}: no rows to write")
    plates = pc.unique(table["plate"]).to_pylist()
    if plates != [plate]:
        raise DatasetError(f"plate {plate}: table holds rows of plates {plates}; a part holds one plate only")
    lengths = pc.binary_length(table["image"])
    if pc.min(lengths).as_py() != image_nbytes or pc.max(lengths).as_py() != image_nbytes:
        raise DatasetError(f"plate {plate}: image byte length differs from C*H*W*itemsize = {image_nbytes}")
    # Controls first, stable otherwise: a stream collects a plate's control context from its first part(s).
    order = np.argsort(~np.asarray(table["is_control"].to_numpy(zero_copy_only=False)), kind="stable")
    table = table.take(pa.array(order))
    rows_per_part = max(1, target_part_bytes // max(1, image_nbytes))
    fs, root_path = filesystem(root, options)
    plate_dir = join(root_path, "plates", plate)
    try:
        fs.makedirs(plate_dir, exist_ok=True)
        existing = set(fs.glob(join(plate_dir, "part-*.parquet")))
        parts: list[Part] = []
        for i, start in enumerate(range(0, table.num_rows, rows_per_part)):
            chunk = table.slice(start, rows_per_part)
            buf = io.BytesIO()
            pq.write_table(chunk, buf, compression="zstd", row_group_size=chunk.num_rows)
            data = buf.getvalue()
            rel = f"plates/{plate}/part-{i:05d}.parquet"
            put_atomic(fs, join(root_path, rel), data)
            existing.discard(join(root_path, rel))
            parts.append(Part(path=rel, plate=plate, rows=chunk.num_rows,
                              controls=int(pc.sum(chunk["is_control"]).as_py() or 0),
                              sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
        for stale in existing:  # parts of an earlier, larger write of this plate
            fs.rm_file(stale)
        marker = {"plate": plate, "parts": [p.__dict__ for p in parts]}
        put_atomic(fs, join(plate_dir, PLATE_MARKER), json.dumps(marker).encode())
    except STORAGE_ERRORS as exc:
        if isinstance(exc, DatasetError):
            raise
        raise describe_error(exc, f"writing plate {plate} under {root}") from exc
    return parts


def written_plate(root: str, plate: str, options: StorageOptions | None = None, verify: bool = True
                  ) -> list[Part] | None:
    """Parts of a plate written earlier (for resuming), or None if absent or not intact."""
    fs, root_path = filesystem(root, options)
    marker = join(root_path, "plates", plate, PLATE_MARKER)
    try:
        if not fs.exists(marker):
            return None
        parts = [Part(**p) for p in json.loads(fs.cat_file(marker))["parts"]]
        for p in parts:
            path = join(root_path, p.path)
            if not fs.exists(path):
                return None
            if verify and hashlib.sha256(fs.cat_file(path)).hexdigest() != p.sha256:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return parts


def write_manifest(root: str, manifest: Manifest, options: StorageOptions | None = None) -> str:
    """Validate and write the manifest last, atomically. Refuses if a listed part is missing."""
    manifest.validate(f"{root}/{MANIFEST_NAME}")
    fs, root_path = filesystem(root, options)
    try:
        present = set(fs.glob(join(root_path, "plates", "*", "part-*.parquet")))
        missing = [p.path for p in manifest.parts if join(root_path, p.path) not in present]
        if missing:
            raise DatasetError(f"{root}/{MANIFEST_NAME}: refusing to write; {len(missing)} listed part(s) missing, "
                               f"e.g. {missing[0]}")
        put_atomic(fs, join(root_path, MANIFEST_NAME), manifest.to_json().encode())
    except DatasetError:
        raise
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"writing {root}/{MANIFEST_NAME}") from exc
    return join(root_path, MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
class ShardDataset:
    """A validated handle on a plate-shard dataset. Cheap to pickle (re-opens its filesystem lazily)."""

    def __init__(self, url: str, options: StorageOptions | None = None, manifest: Manifest | None = None):
        self.url = absolute(url).rstrip("/")
        self.options = options
        self._fs = None
        self.manifest = manifest if manifest is not None else self._read_manifest()
        self._check_selection_rows()

    def __getstate__(self):
        # Cached: every Ray Data read task pickles the handle, and to_dict walks every part.
        if getattr(self, "_state", None) is None:
            self._state = {"url": self.url, "options": self.options, "manifest": self.manifest.to_dict()}
        return self._state

    def __setstate__(self, state):
        self.url, self.options, self._fs, self._state = state["url"], state["options"], None, state
        self.manifest = Manifest.from_dict(state["manifest"], f"{self.url}/{MANIFEST_NAME}")

    def reader(self, parts: Sequence[Part]) -> ShardDataset:
        """A handle that can only read and check `parts`: their entries and plates and the image schema, without
        split schemes or provenance. The whole manifest (100 KB for the `large` preset, mostly provenance) would be
        pickled into every read task and parsed again in every worker: a third of a read's time for small parts."""
        m = self.manifest
        handle = object.__new__(ShardDataset)  # the checks of __init__ ran on the full manifest
        handle.url, handle.options, handle._fs, handle._state = self.url, self.options, None, None
        handle.manifest = replace(m, parts=list(parts), plates={p.plate: m.plates[p.plate] for p in parts},
                                  split_schemes={}, provenance={})
        return handle

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem(self.url, self.options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves _root
        return self._root

    def _read_manifest(self) -> Manifest:
        where = f"{self.url}/{MANIFEST_NAME}"
        try:
            text = self.fs.cat_file(join(self.root, MANIFEST_NAME))
        except FileNotFoundError:
            raise DatasetError(f"{where}: not found (not a platebench dataset, or its write did not finish)") from None
        except STORAGE_ERRORS as exc:
            raise describe_error(exc, where) from exc
        return Manifest.from_json(text, where)

    def _check_selection_rows(self) -> None:
        """Where the manifest alone cannot tell (Manifest.selection_overlaps), read the metadata rows: no row may
        be in both the selection split and a test split. Not on unpickling: Ray tasks get checked handles."""
        where = f"{self.url}/{MANIFEST_NAME}"
        pending = [(sname, split, plates) for sname in self.manifest.split_schemes
                   for split, plates in self.manifest.selection_overlaps(sname, where).items()]
        key = (self.url, self.manifest.checksum())
        if not pending or key in _SELECTION_CHECKED:
            return
        for sname, split, plates in pending:
            sel = self.manifest.split_schemes[sname].selection_split
            both = self.split_expression(sname, sel) & self.split_expression(sname, split)
            rows = self.metadata(plates).filter(both)
            if rows.num_rows:
                first = rows.slice(0, 1).to_pylist()[0]
                raise DatasetError(
                    f"{where}: split_schemes.{sname}: selection split {sel!r} and test split {split!r} both "
                    f"select {rows.num_rows} row(s), e.g. image_id {first['image_id']!r} of plate "
                    f"{first['plate']!r}; model selection must never read a test row")
        _SELECTION_CHECKED.add(key)

    def part_url(self, part: Part) -> str:
        return f"{self.url}/{part.path}"

    def read_part(self, part: Part, columns: Sequence[str] | None = None, verify: bool = False,
                  retries: int = 0, backoff_s: float = 1.0) -> pa.Table:
        """Read and validate one part; `columns` projects (image length checks need 'image').

        Whole parts are fetched first and parsed from memory, so a failed fetch (a StorageError, retried
        `retries` times with exponential backoff) is never confused with a damaged file (a DatasetError).
        """
        where = self.part_url(part)
        path = join(self.root, part.path)
        if columns:  # metadata only: range reads of the needed column chunks
            try:
                with self.fs.open(path, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    table = pf.read(columns=list(columns))
            except FileNotFoundError:
                raise DatasetError(f"{where}: part listed in the manifest is missing") from None
            except PermissionError as exc:
                raise describe_error(exc, where) from exc
            except tuple(e for e in STORAGE_ERRORS if e is not OSError) as exc:
                raise describe_error(exc, where) from exc
            except (pa.ArrowException, OSError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise DatasetError(f"{where}: cannot read part (damaged file or failed read: {first[:200]})") from None
            self._check_part(pf.schema_arrow, table, part, where)
            return table
        data = self._fetch(path, where, retries, backoff_s)
        if verify:  # on the bytes fetched, before parsing: a change that still decodes is caught too
            digest = hashlib.sha256(data).hexdigest()
            if digest != part.sha256:
                raise DatasetError(f"{where}: checksum mismatch (plate {part.plate}; manifest sha256 {part.sha256}, "
                                   f"bytes read {digest})")
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            table = pf.read()
        except (pa.ArrowException, OSError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DatasetError(f"{where}: damaged part, not a readable Parquet file ({first[:200]})") from None
        self._check_part(pf.schema_arrow, table, part, where)
        return table

    def _fetch(self, path: str, where: str, retries: int, backoff_s: float) -> bytes:
        import time

        for attempt in range(retries + 1):
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                raise DatasetError(f"{where}: part listed in the manifest is missing") from None
            except STORAGE_ERRORS as exc:
                if isinstance(exc, PermissionError) or attempt == retries:
                    err = describe_error(exc, where)
                    if attempt:
                        err = StorageError(f"{err} (gave up after {attempt + 1} attempts)")
                    raise err from exc
                time.sleep(backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _check_part(self, file_schema: pa.Schema, table: pa.Table, part: Part, where: str) -> None:
        expected = self.manifest.schema()
        got = {f.name: f.type for f in file_schema}
        for f in expected:
            if f.name not in got:
                raise DatasetError(f"{where}: schema mismatch, column {f.name!r} is missing")
            ok = got[f.name] == f.type or (f.name == "image" and pa.types.is_large_binary(got[f.name]))
            if not ok:
                raise DatasetError(f"{where}: schema mismatch, column {f.name!r} has type {got[f.name]}, "
                                   f"expected {f.type}")
        extra = set(got) - set(expected.names)
        if extra:
            raise DatasetError(f"{where}: schema mismatch, unexpected column(s) {sorted(extra)}")
        if table.num_rows != part.rows:
            raise DatasetError(f"{where}: row count mismatch (manifest {part.rows}, file {table.num_rows})")
        if "image" in table.column_names and table.num_rows:
            lengths = pc.binary_length(table["image"])
            n = self.manifest.image_nbytes
            if pc.min(lengths).as_py() != n or pc.max(lengths).as_py() != n:
                bad = pc.index(pc.not_equal(lengths, n), True).as_py()
                raise DatasetError(f"{where}: field 'image' at row {bad} has {lengths[bad].as_py()} bytes, expected "
                                   f"{n} (C*H*W*itemsize for {self.manifest.image_shape} {self.manifest.dtype})")
        if "plate" in table.column_names and table.num_rows:
            plates = pc.unique(table["plate"]).to_pylist()
            if plates != [part.plate]:
                raise DatasetError(f"{where}: field 'plate' holds {plates}, manifest says {part.plate!r}")

    def images(self, table: pa.Table) -> np.ndarray:
        return decode_images(table["image"], self.manifest.image_shape, self.manifest.dtype)

    def verify(self, on_part=None) -> list[str]:
        """Check every part's bytes, schema, row count and images. Returns one problem line per bad part."""
        problems = []
        for part in self.manifest.parts:
            try:
                self.read_part(part, verify=True)
            except (DatasetError, StorageError) as exc:
                problems.append(str(exc))
            if on_part:
                on_part(part)
        return problems

    def split_expression(self, scheme: str, split: str):
        sch = self.manifest.scheme(scheme)
        if split not in sch.splits:
            raise DatasetError(f"split {split!r} is not in scheme {scheme!r} (splits: {sorted(sch.splits)})")
        return predicates.to_expression(sch.splits[split])

    def metadata(self, plates: Sequence[str] | None = None) -> pa.Table:
        """All metadata columns (no images) of the given plates (default all), validated per part."""
        cols = [c for c in self.manifest.schema().names if c != "image"]
        wanted = set(plates) if plates is not None else None
        tables = [self.read_part(p, columns=cols) for p in self.manifest.parts
                  if wanted is None or p.plate in wanted]
        if not tables:
            return self.manifest.schema().empty_table().drop_columns(["image"])
        return pa.concat_tables(tables)

    def split_metadata(self, scheme: str, split: str) -> pa.Table:
        plates = self.manifest.plates_for(scheme, split)
        return self.metadata(plates).filter(self.split_expression(scheme, split))


def open_dataset(url: str, options: StorageOptions | None = None) -> ShardDataset:
    return ShardDataset(url, options)
