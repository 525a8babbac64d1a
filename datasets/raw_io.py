"""Reading raw inputs for ingestion: tables (CSV, CSV.gz, Parquet), many small files, PNG/TIFF decoding,
and the output geometry (resize / centre crop). Every error names the file.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import DatasetError, StorageError
from .storage import StorageOptions, describe_error, filesystem

FETCH_CHUNK = 128  # files per concurrent request batch (s3fs fetches a list concurrently)


# ---------------------------------------------------------------------------------------------
# files and tables
# ---------------------------------------------------------------------------------------------
def url_join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts]])


def read_bytes(url: str, options: StorageOptions | None, what: str = "file") -> bytes:
    fs, path = filesystem(url, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(f"{url}: {what} not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{url}: expected a {what}, found a folder") from None
    except OSError as exc:
        raise describe_error(exc, url) from exc


def exists(url: str, options: StorageOptions | None) -> bool:
    fs, path = filesystem(url, options)
    try:
        return fs.exists(path)
    except OSError as exc:
        raise describe_error(exc, url) from exc


def first_existing(folder: str, names: Iterable[str], options: StorageOptions | None) -> str | None:
    """URL of the first of `names` present in `folder`: one listing, or (HTTP, e.g. a GitHub raw URL,
    which cannot list) one existence check per name."""
    names = list(names)
    fs, path = filesystem(folder, options)
    try:
        if str(folder).startswith(("http://", "https://")):
            return next((url_join(folder, n) for n in names if fs.exists(url_join(path, n))), None)
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise describe_error(exc, folder) from exc
    return next((url_join(folder, n) for n in names if n in present), None)


def _gunzip(data: bytes, url: str) -> bytes:
    if url.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{url}: not a readable gzip file ({exc})") from None
    return data


def read_table(url: str, options: StorageOptions | None, delimiter: str = ",") -> pa.Table:
    """A CSV (optionally .gz) or Parquet file as a table. CSV columns are all read as strings: ids such
    as plate barcodes look numeric in some sources, and a silently converted id is a wrong join."""
    data = read_bytes(url, options, "table")
    if url.endswith(".parquet"):
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{url}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    text = _gunzip(data, url)
    first = text.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    header = next(csv.reader([first], delimiter=delimiter), [])
    if not header or not any(h.strip() for h in header):
        raise DatasetError(f"{url}: empty file or missing header row")
    try:
        return pacsv.read_csv(
            io.BytesIO(text), read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                                 strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{url}: not a readable CSV file ({str(exc).splitlines()[0]})") from None


def require_columns(table: pa.Table, columns: Iterable[str], url: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"{url}: missing column(s) {missing} (columns: {table.column_names})")


def int_column(table: pa.Table, name: str, url: str) -> list[int]:
    values = table.column(name).to_pylist()
    out = []
    for i, v in enumerate(values):
        try:
            out.append(int(v) if not isinstance(v, str) else int(v.strip()))
        except (TypeError, ValueError):
            raise DatasetError(f"{url}: row {i + 2}, column {name!r}: {v!r} is not an integer") from None
    return out


def fetch_many(urls: list[str], options: StorageOptions | None) -> Iterator[tuple[str, bytes | Exception]]:
    """Yield (url, bytes or the exception) for many files; remote lists are fetched concurrently."""
    if not urls:
        return
    fs, _ = filesystem(urls[0], options)
    for start in range(0, len(urls), FETCH_CHUNK):
        chunk = urls[start:start + FETCH_CHUNK]
        paths = [filesystem(u, options)[1] for u in chunk]
        try:
            got = fs.cat(paths, on_error="return")
        except OSError as exc:
            raise describe_error(exc, chunk[0]) from exc
        if not isinstance(got, dict):  # a single path returns bytes
            got = {paths[0]: got}
        for url, path in zip(chunk, paths):
            value = got.get(path, FileNotFoundError(path))
            yield url, value


def missing_or_error(url: str, value: bytes | Exception) -> str | None:
    """None if `value` is bytes; the reason for a missing file; raise for storage trouble."""
    if isinstance(value, bytes):
        return None
    if isinstance(value, (FileNotFoundError, IsADirectoryError)) or "nosuchkey" in str(value).lower():
        return "file is missing"
    raise describe_error(value, url) if isinstance(value, BaseException) else StorageError(f"{url}: {value!r}")


def write_json(url: str, obj, options: StorageOptions | None) -> None:
    """Write JSON atomically, as the shard writer does."""
    import json

    from .storage import put_atomic

    fs, path = filesystem(url, options)
    try:
        put_atomic(fs, path, json.dumps(obj, indent=1, default=str).encode())
    except OSError as exc:
        raise describe_error(exc, url) from exc


def read_json(url: str, options: StorageOptions | None):
    """Parsed JSON, or None if absent or unreadable (used for resume sidecars)."""
    import json

    fs, path = filesystem(url, options)
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
PIL_MODES = {"L": ("uint8", 1), "RGB": ("uint8", 3), "I;16": ("uint16", 1), "I;16B": ("uint16", 1),
             "I": ("int32", 1), "F": ("float32", 1), "RGBA": ("uint8", 4), "LA": ("uint8", 2), "P": ("uint8", 1),
             "1": ("bool", 1)}


class DecodeError(Exception):
    """A file's content is wrong (format, mode, size, dtype); the caller turns it into a bad item."""


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """PNG bytes -> array [H, W] (mode L) or [H, W, C]; DecodeError if not a PNG of that mode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise DecodeError(f"not a PNG (format {im.format})")
            if im.mode != mode:
                dtype, channels = PIL_MODES.get(im.mode, ("?", "?"))
                want_dtype, want_ch = PIL_MODES[mode]
                raise DecodeError(f"PNG mode {im.mode} ({channels} channel(s) of {dtype}), expected {mode} "
                                  f"({want_ch} channel(s) of {want_dtype})")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"not a readable PNG ({exc})") from None


def decode_tiff(data: bytes) -> np.ndarray:
    """Single-plane TIFF bytes -> 2-D array; DecodeError otherwise."""
    import tifffile

    try:
        arr = tifffile.imread(io.BytesIO(data))
    except Exception as exc:  # tifffile raises many types for corrupt input
        raise DecodeError(f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DecodeError(f"TIFF has shape {arr.shape}, expected one 2-D plane")
    return arr


# ---------------------------------------------------------------------------------------------
# output geometry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """How native images become the output H x W: unchanged, resized (bilinear, antialiased by Pillow
    when shrinking) or centre-cropped to size x size."""

    mode: str = "none"  # none | resize | crop
    size: int | None = None

    @classmethod
    def from_options(cls, resize: int | None, crop: int | None) -> Geometry:
        if resize and crop:
            raise DatasetError("pass at most one of --resize and --crop")
        for name, v in (("resize", resize), ("crop", crop)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise DatasetError(f"--{name}: must be a positive integer, got {v!r}")
        if resize:
            return cls("resize", resize)
        if crop:
            return cls("crop", crop)
        return cls()

    def out_shape(self, h: int, w: int, where: str) -> tuple[int, int]:
        if self.mode == "none":
            return h, w
        if self.mode == "crop" and (self.size > h or self.size > w):
            raise DatasetError(f"{where}: --crop {self.size} is larger than the images ({h}x{w})")
        return self.size, self.size

    def apply(self, img: np.ndarray) -> np.ndarray:
        """[H, W] or [H, W, C] uint8 -> output size."""
        if self.mode == "none":
            return img
        h, w = img.shape[:2]
        if self.mode == "crop":
            top, left = (h - self.size) // 2, (w - self.size) // 2
            return img[top:top + self.size, left:left + self.size]
        from PIL import Image

        if img.dtype != np.uint8:
            raise DatasetError(f"resize expects uint8 images, got {img.dtype}")
        return np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR))

    def describe(self) -> dict:
        return {"mode": self.mode, "size": self.size}
