"""JUMP-CP metadata: plates, wells, compounds (jump-cellpainting/datasets `metadata/`) and MoA annotations.

Tables of the jump-cellpainting/datasets repository, all read with string columns:
  plate.csv.gz     Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_PlateType
  well.csv.gz      Metadata_Source, Metadata_Plate, Metadata_Well, Metadata_JCP2022
  compound.csv.gz  Metadata_JCP2022, Metadata_InChIKey, ...
  MoA table        compound_rephub_annot.csv.gz style: Metadata_InChIKey, Metadata_pert_iname, Metadata_moa
                   (pipe-delimited multi-labels); the `_full` variant without the Metadata_ prefix works too.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from . import raw_io
from .errors import DatasetError

DMSO = "JCP2022_033924"  # compound negative control
EMPTY = "JCP2022_999999"  # empty well: dropped
UNKNOWN = "JCP2022_UNKNOWN"  # unknown treatment: dropped
# The 8 JUMP compound positive controls = the 8 classes of the CS-ARM-BN MoA protocol.
POSCONS = {
    "JCP2022_012818": "TC-S-7004", "JCP2022_025848": "dexamethasone", "JCP2022_035095": "LY2109761",
    "JCP2022_037716": "AMG900", "JCP2022_046054": "FK-866", "JCP2022_050797": "quinidine",
    "JCP2022_064022": "NVS-PAK1-1", "JCP2022_085227": "aloxistatin",
}
# source_3 batches CS-ARM-BN leaves out (preprocess/images/03-create_indices.py).
CSARMBN_EXCLUDED_BATCHES = ["CP_33_all_Phenix1", "CP_34_mix_Phenix1", "CP_35_all_Phenix1", "CP_36_all_Phenix1"]


def table_url(folder: str, stem: str, options) -> str:
    url = raw_io.first_existing(folder, [f"{stem}.csv.gz", f"{stem}.csv", f"{stem}.parquet"], options)
    if url is None:
        raise DatasetError(f"{folder}: no {stem}.csv.gz (or .csv/.parquet) — --metadata must name the "
                           f"jump-cellpainting/datasets metadata folder")
    return url


def _strings(table: pa.Table, columns: list[str], url: str) -> dict[str, list]:
    raw_io.require_columns(table, columns, url)
    return {c: [None if v is None else str(v) for v in table.column(c).to_pylist()] for c in columns}


def read_plates(folder: str, options, sources: list[str], plate_types: list[str],
                exclude_batches: list[str]) -> tuple[list[dict], dict[str, set[str]], dict]:
    """Plates to ingest (sorted), every known plate per source, and counts of what the filters left out."""
    url = table_url(folder, "plate", options)
    cols = _strings(raw_io.read_table(url, options),
                    ["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType"], url)
    known: dict[str, set[str]] = defaultdict(set)
    chosen, seen, dropped = [], {}, defaultdict(int)
    for src, batch, plate, ptype in zip(*(cols[c] for c in cols)):
        known[src].add(plate)
        if src not in sources:
            continue
        if ptype not in plate_types:
            dropped[f"plate type {ptype}"] += 1
            continue
        if batch in exclude_batches:
            dropped[f"excluded batch {batch}"] += 1
            continue
        if plate in seen:
            raise DatasetError(f"{url}: plate {plate!r} is listed twice ({seen[plate]} and {src}/{batch}); "
                               f"plate names must be unique")
        seen[plate] = f"{src}/{batch}"
        chosen.append({"source": src, "batch": batch, "plate": plate, "plate_type": ptype})
    absent = [s for s in sources if s not in known]
    if absent:
        raise DatasetError(f"{url}: source(s) {absent} not found (sources: {sorted(known)})")
    if not chosen:
        raise DatasetError(f"{url}: no plates of source(s) {sources} with plate type(s) {plate_types}")
    chosen.sort(key=lambda p: (p["source"], p["batch"], p["plate"]))
    return chosen, dict(known), dict(dropped)


def read_wells(folder: str, options, plates: list[dict]) -> dict[tuple[str, str], dict[str, str]]:
    """(source, plate) -> {well: JCP2022 id} for the chosen plates."""
    url = table_url(folder, "well", options)
    table = raw_io.read_table(url, options)
    raw_io.require_columns(table, ["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"], url)
    wanted = sorted({p["plate"] for p in plates})
    table = table.filter(pc.is_in(table["Metadata_Plate"].cast(pa.string()), value_set=pa.array(wanted)))
    cols = _strings(table, ["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"], url)
    out: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for src, plate, well, jcp in zip(*(cols[c] for c in cols)):
        wells = out[(src, plate)]
        if wells.setdefault(well, jcp) != jcp:
            raise DatasetError(f"{url}: well {src}/{plate}/{well} is listed with two compounds "
                               f"({wells[well]}, {jcp})")
    return dict(out)


def _col(table: pa.Table, name: str) -> str | None:
    for c in (f"Metadata_{name}", name):
        if c in table.column_names:
            return c
    return None


def read_moa(url: str, options, folder: str, compounds: set[str]) -> dict[str, dict]:
    """JCP2022 id -> {"name", "moa": sorted list} for `compounds`, joined on InChIKey through compound.csv.gz.
    Several MoA-table rows for one InChIKey are merged (union of their MoAs)."""
    ctab_url = table_url(folder, "compound", options)
    ctab = _strings(raw_io.read_table(ctab_url, options), ["Metadata_JCP2022", "Metadata_InChIKey"], ctab_url)
    key_of = {j: k for j, k in zip(ctab["Metadata_JCP2022"], ctab["Metadata_InChIKey"]) if j in compounds and k}
    table = raw_io.read_table(url, options)
    key_col, moa_col, name_col = _col(table, "InChIKey"), _col(table, "moa"), _col(table, "pert_iname")
    if key_col is None or moa_col is None:
        raise DatasetError(f"{url}: a MoA table needs columns Metadata_InChIKey and Metadata_moa (or InChIKey, "
                           f"moa); columns: {table.column_names}")
    keys = table.column(key_col).to_pylist()
    moas = table.column(moa_col).to_pylist()
    names = table.column(name_col).to_pylist() if name_col else [None] * len(keys)
    by_key: dict[str, dict] = {}
    for k, m, n in zip(keys, moas, names):
        if not k:
            continue
        entry = by_key.setdefault(k, {"name": None, "moa": set()})
        entry["name"] = entry["name"] or (n or None)
        entry["moa"].update(x.strip() for x in (m or "").split("|") if x.strip())
    out = {}
    for jcp, key in key_of.items():
        if key in by_key:
            out[jcp] = {"name": by_key[key]["name"], "moa": sorted(by_key[key]["moa"])}
    return out
