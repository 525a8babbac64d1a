"""RxRx1 (Recursion, rxrx.ai release): `metadata.csv` + per-channel 8-bit PNGs -> plate shards.

Layout:
    <src>/metadata.csv                                       11 columns, one row per site
    <src>/images/<experiment>/Plate<p>/<well>_s<site>_w<ch>.png   ch = 1..6, 8-bit grayscale, 512x512

Mapping to the shard schema (decisions documented here and in docs/datasets.md):
- image_id = site_id; plate = "<experiment>_<plate>" (plate numbers repeat across experiments);
  batch = experiment; cell_type = cell_type; perturbation = sirna; label = sirna_id (all 1,139 ids are
  classes, the negative control 1138 included, as WILDS does); is_control = well_type == negative_control.
- source = "recursion": `source` is the lab that made the images (JUMP's meaning); all of RxRx1 comes
  from one lab, and cell type already has its own column and domain kind.
- Split scheme "official": test = dataset == "test" (the 18 held-out experiments). Model selection must
  never read test, so val = the highest-numbered train experiment of each cell type that has at least two
  (HEPG2-07, HUVEC-16, RPE-07, U2OS-03 on the real data) and train = the other train experiments: an
  unseen-experiment validation, the same kind of shift as the test.
The native image size is read from the first image (documented 512x512) and every other image must match.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from . import raw_io
from .errors import DatasetError
from .ingest_common import (
    INGEST_VERSION,
    Adapter,
    BadItems,
    IngestPlan,
    class_names,
    contiguous_classes,
    scheme,
    with_batches,
)
from .raw_io import DecodeError, Geometry, url_join
from .shards import make_table

SOURCE = "recursion"
CHANNELS = [f"w{i}" for i in range(1, 7)]
# [S] stains of w1..w6 (several independent codebases agree; not in the official README)
STAINS = {"w1": "Hoechst", "w2": "concanavalin A", "w3": "phalloidin", "w4": "SYTO 14", "w5": "MitoTracker",
          "w6": "WGA"}
WELL_TYPES = ("treatment", "positive_control", "negative_control")
REQUIRED = ("site_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type", "sirna",
            "sirna_id")
EXTRA_COLUMNS = {"dataset": "string", "well_type": "string"}
PROBE_TRIES = 50


# ---------------------------------------------------------------------------------------------
# metadata (shared with rxrx1_wilds)
# ---------------------------------------------------------------------------------------------
def read_metadata(url: str, options, *, datasets: tuple[str, ...], bad: BadItems,
                  derive: Callable[[dict], dict] | None = None, table=None) -> list[dict]:
    """Rows of metadata.csv as dicts, validated. `derive` fills optional columns a variant may lack."""
    table = raw_io.read_table(url, options) if table is None else table
    cols = table.column_names
    rows = [dict(zip(cols, values)) for values in zip(*(table.column(c).to_pylist() for c in cols))]
    if derive is not None:
        rows = [derive(r) for r in rows]
    missing = [c for c in REQUIRED if rows and c not in rows[0]] or ([] if rows else list(REQUIRED))
    if missing:
        raise DatasetError(f"{url}: missing column(s) {missing} (columns: {cols})")
    out, seen = [], {}
    for line, r in enumerate(rows, start=2):
        item = f"row {line} site_id={r['site_id']}"
        try:
            r["plate"], r["site"], r["sirna_id"] = int(r["plate"]), int(r["site"]), int(r["sirna_id"])
        except (TypeError, ValueError):
            bad.bad(item, url, f"plate/site/sirna_id must be integers, got {r['plate']!r}/{r['site']!r}/"
                               f"{r['sirna_id']!r}")
            continue
        expected_id = f"{r['experiment']}_{r['plate']}_{r['well']}_{r['site']}"
        problem = None
        if r["site_id"] != expected_id:
            problem = f"site_id {r['site_id']!r} does not match experiment/plate/well/site ({expected_id!r})"
        elif r["dataset"] not in datasets:
            problem = f"column 'dataset' is {r['dataset']!r}, expected one of {list(datasets)}"
        elif r["well_type"] not in WELL_TYPES:
            problem = f"column 'well_type' is {r['well_type']!r}, expected one of {list(WELL_TYPES)}"
        elif r["sirna_id"] < 0:
            problem = f"negative sirna_id {r['sirna_id']}"
        elif "/" in r["experiment"] or not r["experiment"]:
            problem = f"experiment name {r['experiment']!r} cannot be a folder name"
        elif r["site_id"] in seen:
            problem = f"site_id {r['site_id']!r} repeats row {seen[r['site_id']]}"
        if problem:
            bad.bad(item, url, problem)
            continue
        seen[r["site_id"]] = line
        out.append(r)
    if not out:
        raise DatasetError(f"{url}: no usable rows")
    return out


def group_plates(rows: list[dict], url: str, bad: BadItems) -> list[dict]:
    """Plate work items: one per (experiment, plate), rows stored column-wise."""
    by_plate: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_plate[f"{r['experiment']}_{r['plate']}"].append(r)
    plates = []
    for name in sorted(by_plate):
        prs = by_plate[name]
        cell_types = sorted({r["cell_type"] for r in prs})
        if len(cell_types) != 1:
            raise DatasetError(f"{url}: plate {name} mixes cell types {cell_types}; one plate has one cell type")
        cols = ("site_id", "well", "site", "sirna", "sirna_id", "dataset", "well_type")
        plates.append({"plate": name, "source": SOURCE, "batch": prs[0]["experiment"], "cell_type": cell_types[0],
                       "experiment": prs[0]["experiment"], "plate_number": prs[0]["plate"],
                       "rows": {c: [r[c] for r in prs] for c in cols}})
    return plates


def labels_and_classes(rows: list[dict], url: str) -> list[str]:
    k = contiguous_classes((r["sirna_id"] for r in rows), f"{url}: column 'sirna_id'")
    return class_names(((r["sirna_id"], r["sirna"]) for r in rows), k, f"{url}: columns sirna_id/sirna")


def negative_control(rows: list[dict]) -> dict:
    values = sorted({r["sirna"] for r in rows if r["well_type"] == "negative_control"})
    return {"description": "negative-control wells (well_type == negative_control)", "column": "perturbation",
            "values": values}


def experiments_by_dataset(rows: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        out[r["dataset"]].add(r["experiment"])
    return out


# ---------------------------------------------------------------------------------------------
# images (shared with rxrx1_wilds)
# ---------------------------------------------------------------------------------------------
def probe_size(plates: list[dict], files: Callable[[str, dict, int], list[str]], root: str, mode: str, options,
               bad: BadItems) -> tuple[int, int]:
    """Native H, W from the first readable image (every image must then match it)."""
    tried = 0
    for plate in plates:
        for i in range(len(plate["rows"]["site_id"])):
            url = files(root, plate, i)[0]
            tried += 1
            try:
                arr = raw_io.decode_png(raw_io.read_bytes(url, options, "image"), mode)
                return int(arr.shape[0]), int(arr.shape[1])
            except (DatasetError, DecodeError) as exc:
                if bad.strict:
                    raise DatasetError(f"{url}: {exc}" if isinstance(exc, DecodeError) else str(exc)) from None
            if tried >= PROBE_TRIES:
                raise DatasetError(f"{root}: none of the first {tried} images is readable; cannot learn the size")
    raise DatasetError(f"{root}: no readable image found")


def load_plate_images(plan: IngestPlan, plate: dict, skipped: list | None,
                      files: Callable[[str, dict, int], list[str]], mode: str):
    """Read, check and stack one plate's images; rows with a bad image are skipped or raise."""
    s = plan.settings
    bad = BadItems(skipped, plate["plate"])
    geometry = Geometry(**s["geometry"])
    native = tuple(s["native_size"])
    rows = plate["rows"]
    n, c = len(rows["site_id"]), len(plan.channels)
    urls = [files(s["root"], plate, i) for i in range(n)]
    per_row = len(urls[0]) if urls else 1  # one file per channel (RxRx1) or one RGB file (WILDS)
    flat = [u for row in urls for u in row]
    images = np.zeros((n, c, plan.height, plan.width), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    for k, (url, value) in enumerate(raw_io.fetch_many(flat, plan.src_options)):
        i, ch = divmod(k, per_row)
        if not ok[i]:
            continue
        reason = raw_io.missing_or_error(url, value)
        if reason is None:
            try:
                arr = raw_io.decode_png(value, mode)
                if arr.shape[:2] != native:
                    raise DecodeError(f"image is {arr.shape[0]}x{arr.shape[1]}, expected {native[0]}x{native[1]} "
                                      f"like the rest of the dataset")
                arr = geometry.apply(arr)
                if arr.ndim == 2:
                    images[i, ch] = arr
                else:
                    images[i] = np.moveaxis(arr, -1, 0)
            except DecodeError as exc:
                reason = str(exc)
        if reason is not None:
            ok[i] = False
            bad.bad(f"site_id={rows['site_id'][i]}", url, f"{reason} (image of metadata row site_id="
                                                           f"{rows['site_id'][i]})")
    keep = np.flatnonzero(ok)
    neg = s["negative_control_well_type"]
    meta = {
        "image_id": [rows["site_id"][i] for i in keep],
        "source": [plate["source"]] * len(keep), "batch": [plate["batch"]] * len(keep),
        "plate": [plate["plate"]] * len(keep), "well": [rows["well"][i] for i in keep],
        "site": [rows["site"][i] for i in keep], "cell_type": [plate["cell_type"]] * len(keep),
        "perturbation": [rows["sirna"][i] for i in keep], "label": [rows["sirna_id"][i] for i in keep],
        "is_control": [rows["well_type"][i] == neg for i in keep],
        "dataset": [rows["dataset"][i] for i in keep], "well_type": [rows["well_type"][i] for i in keep],
    }
    return make_table(meta, images if ok.all() else images[keep], plan.extra_columns)  # no copy when all good


# ---------------------------------------------------------------------------------------------
# RxRx1 proper
# ---------------------------------------------------------------------------------------------
def _files(root: str, plate: dict, i: int) -> list[str]:
    r = plate["rows"]
    stem = f"images/{plate['experiment']}/Plate{plate['plate_number']}/{r['well'][i]}_s{r['site'][i]}"
    return [url_join(root, f"{stem}_w{ch}.png") for ch in range(1, 7)]


def official_scheme(rows: list[dict]) -> dict:
    by_ds = experiments_by_dataset(rows)
    train_exps = by_ds.get("train", set())
    cell_of: dict[str, str] = {r["experiment"]: r["cell_type"] for r in rows}
    per_type: dict[str, list[str]] = defaultdict(list)
    for e in sorted(train_exps):
        per_type[cell_of[e]].append(e)
    val_exps = sorted(exps[-1] for exps in per_type.values() if len(exps) >= 2)
    if not val_exps:
        raise DatasetError("rxrx1: no cell type has two train experiments, so no validation experiment can be "
                           "held out (model selection must not read test)")
    train_only = sorted(train_exps - set(val_exps))
    is_train = {"column": "dataset", "eq": "train"}
    return {"official": scheme(
        "RxRx1 official split by experiment: train = dataset 'train' minus one held-out experiment per cell type "
        f"(val = {', '.join(val_exps)}); test = dataset 'test' (unseen experiments)",
        {"train": with_batches(is_train, train_only), "val": with_batches(is_train, val_exps),
         "test": with_batches({"column": "dataset", "eq": "test"}, by_ds.get("test", set()))},
        "val", "held-out-train-experiments")}


def plan_rxrx1(config: dict, *, src_options, skip_bad: bool, pmap=map) -> IngestPlan:
    root = str(config["src"]).rstrip("/")
    url = url_join(root, "metadata.csv")
    bad = BadItems([] if skip_bad else None)
    rows = read_metadata(url, src_options, datasets=("train", "test"), bad=bad)
    classes = labels_and_classes(rows, url)
    plates = group_plates(rows, url, bad)
    geometry = Geometry.from_options(config["resize"], config["crop"])
    native = probe_size(plates, _files, root, "L", src_options, bad)
    h, w = geometry.out_shape(*native, where=root)
    return IngestPlan(
        adapter="rxrx1", name="rxrx1", version=str(config["version"]), channels=list(CHANNELS), height=h, width=w,
        dtype="uint8", classes=classes, negative_control=negative_control(rows), split_schemes=official_scheme(rows),
        plates=plates, extra_columns=dict(EXTRA_COLUMNS), skipped=bad.skipped or [], src_options=src_options,
        settings={"root": root, "geometry": geometry.describe(), "native_size": list(native),
                  "negative_control_well_type": "negative_control"},
        provenance={"adapter": "rxrx1", "src": root, "metadata": url, "rows": len(rows), "ingest_version":
                    INGEST_VERSION, "native_size": list(native), "geometry": geometry.describe(),
                    "channel_stains [S]": STAINS, "source": "constant 'recursion' (one lab); cell type is a column",
                    "selection": "val = last train experiment (by name) of each cell type with >= 2 train "
                                 "experiments; never the test experiments"})


def load_rxrx1(plan: IngestPlan, plate: dict, skipped: list | None):
    return load_plate_images(plan, plate, skipped, _files, "L")


ADAPTER = Adapter(
    name="rxrx1", description="RxRx1 (rxrx.ai): metadata.csv + 6 single-channel 8-bit PNGs per site",
    defaults={"src": None, "resize": None, "crop": None, "version": "1"},
    plan_fn=plan_rxrx1, load_fn=load_rxrx1)
