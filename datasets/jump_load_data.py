"""JUMP load_data files: where each site's channel images (and illumination functions) are.

`<src>/<source>/workspace/load_data_csv/<batch>/<plate>/` holds `load_data_with_illum.parquet` and/or
`load_data[_with_illum].csv[.gz]`, one row per site. Image locations always come
from these files, never from a filename template (vendor names differ per microscope). Accepted forms per
channel C: `URL_OrigC`, `URL_C`, or `PathName_OrigC` + `FileName_OrigC` (PathName with or without a
trailing slash); illumination: `URL_IllumC` or `PathName_IllumC` + `FileName_IllumC`.
Site numbers are 0-based in some sources and 1-based in others; the caller normalises to 1-based.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from . import raw_io
from .errors import DatasetError, StorageError

NAMES = ["load_data_with_illum.parquet", "load_data_with_illum.csv.gz", "load_data.parquet", "load_data.csv.gz",
         "load_data_with_illum.csv", "load_data.csv"]
NAMES_WITH_ILLUM = [n for n in NAMES if "with_illum" in n]


def folder(src: str, source: str, batch: str, plate: str) -> str:
    return raw_io.url_join(src, source, "workspace", "load_data_csv", batch, plate)


def map_url(url: str, path_map: list[list[str]]) -> str:
    """Rewrite a load_data URL for a mirror (e.g. s3://cellpainting-gallery/cpg0016-jump -> /data/cpg0016-jump)."""
    for old, new in path_map:
        if url.startswith(old):
            return new + url[len(old):]
    return url


def _join(path: str | None, name: str | None) -> str | None:
    if not path or not name:
        return None
    return f"{path.rstrip('/')}/{name}"


def channel_urls(table: pa.Table, channels: list[str], url: str, kind: str = "Orig") -> dict[str, list]:
    """Channel -> per-row URL (None where the row has no value)."""
    cols = set(table.column_names)
    out = {}
    for ch in channels:
        forms = [f"URL_{kind}{ch}"] + ([f"URL_{ch}"] if kind == "Orig" else [])
        direct = next((c for c in forms if c in cols), None)
        if direct:
            out[ch] = [v or None for v in table.column(direct).to_pylist()]
        elif f"PathName_{kind}{ch}" in cols and f"FileName_{kind}{ch}" in cols:
            paths = table.column(f"PathName_{kind}{ch}").to_pylist()
            names = table.column(f"FileName_{kind}{ch}").to_pylist()
            out[ch] = [_join(p, n) for p, n in zip(paths, names)]
        else:
            have = sorted({c.split(kind, 1)[1] for c in cols if c.startswith((f"FileName_{kind}", f"URL_{kind}"))})
            raise DatasetError(f"{url}: no columns for {kind.lower()} channel {ch!r} (need URL_{kind}{ch} or "
                               f"PathName_{kind}{ch} + FileName_{kind}{ch}; {kind.lower()} channels present: {have})")
    return out


def read(url: str, options) -> pa.Table:
    table = raw_io.read_table(url, options)
    raw_io.require_columns(table, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"], url)
    return table


def find(spec: dict, options) -> str | None:
    names = NAMES_WITH_ILLUM if spec["illum"] else NAMES
    return raw_io.first_existing(spec["folder"], names, options)


def scan(spec: dict) -> dict:
    """Planning pass over one plate's load_data (runs in parallel, returns plain data, never raises for
    bad data): sites per well, the smallest site number, the first row's channel URLs (for probing sizes),
    and rows that belong to another plate."""
    out = {"plate": spec["plate"], "source": spec["source"], "error": None, "error_type": None, "missing": None,
           "problems": []}
    options = spec["options"]
    try:
        url = find(spec, options)
        if url is None:
            names = NAMES_WITH_ILLUM if spec["illum"] else NAMES
            out["missing"] = {"file": spec["folder"], "reason": f"no load_data file (looked for {', '.join(names)})"}
            return out
        table = read(url, options)
        urls = channel_urls(table, spec["channels"], url)
        if spec["illum"]:
            channel_urls(table, spec["channels"], url, kind="Illum")
        plates = [str(p) for p in table.column("Metadata_Plate").to_pylist()]
        sources = ([str(s) for s in table.column("Metadata_Source").to_pylist()]
                   if "Metadata_Source" in table.column_names else [spec["source"]] * len(plates))
        wells = [str(w) for w in table.column("Metadata_Well").to_pylist()]
        sites = raw_io.int_column(table, "Metadata_Site", url)
        counts: Counter = Counter()
        first = None
        for i, (p, s, w) in enumerate(zip(plates, sources, wells)):
            if p != spec["plate"] or s != spec["source"]:  # the driver words the reason (it knows all plates)
                out["problems"].append({"item": f"row {i} Metadata_Plate={p} Metadata_Well={w}", "file": url,
                                        "source": s, "plate": p})
                continue
            counts[w] += 1
            if first is None:
                first = {ch: map_url(urls[ch][i], spec["path_map"]) if urls[ch][i] else None for ch in urls}
        out.update(load_data=url, wells=dict(counts), site_min=min(sites) if sites else None, probe=first)
    except (DatasetError, StorageError) as exc:
        out["error"], out["error_type"] = str(exc), type(exc).__name__
    return out


def plate_rows(entry: dict, settings: dict, options) -> tuple[str, list[dict]]:
    """Rows of this plate's load_data restricted to the planned wells: well, raw site, channel URLs."""
    url = entry["load_data"]
    table = read(url, options)
    channels = settings["channels"]
    orig = channel_urls(table, channels, url)
    illum = channel_urls(table, channels, url, kind="Illum") if settings["illum"] else None
    pm = settings["path_map"]
    plates = [str(p) for p in table.column("Metadata_Plate").to_pylist()]
    wells = [str(w) for w in table.column("Metadata_Well").to_pylist()]
    sites = raw_io.int_column(table, "Metadata_Site", url)
    rows = []
    for i, (p, w, s) in enumerate(zip(plates, wells, sites)):
        if p != entry["plate"] or w not in entry["wells"]:
            continue
        rows.append({"row": i, "well": w, "site": s,
                     "urls": [map_url(orig[c][i], pm) if orig[c][i] else None for c in channels],
                     "illum": [map_url(illum[c][i], pm) if illum[c][i] else None for c in channels]
                     if illum else None})
    return url, rows
