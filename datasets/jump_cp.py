"""JUMP-CP (cpg0016) -> plate shards under the CS-ARM-BN MoA protocol.

Plan: plates from plate.csv.gz (chosen sources, plate types, minus the CS-ARM-BN excluded batches) ->
a parallel scan of each plate's load_data -> wells joined to well.csv.gz -> rows kept: the class compounds
(default the 8 positive controls, one class each) and DMSO (negative control, label -1); empty wells
(JCP2022_999999), unknown treatments and wells without metadata are dropped; with `compounds="all"` every
other compound is kept unlabelled (label -1). As in CS-ARM-BN, labelled (compound, well position) pairs with
<= `min_position_images` sites in a source are dropped (default 36). Counts of everything dropped go to
provenance (these are protocol filters, not bad items).

Labels: `label_by="compound"` (default, the protocol): class = compound; the MoA table only annotates
classes (provenance "class_annotations", multi-MoA lists kept whole). `label_by="moa"`: class = MoA string;
compounds with several MoAs (pipe-delimited) or none are dropped (counted), because one image gets one label.

Splits (selection on val only, val = ceil(15 %) of the training batches, seeded shuffle, as CS-ARM-BN's
GroupShuffleSplit over Metadata_Batch; with one training batch, 15 % of its plates instead):
  plate-folds-<source>-<k>             GroupKFold-like folds of that source's plates (largest plate first,
                                       into the fold with fewest images); test = fold k ("new batches")
  source-to-source-<A>-to-<B>          train/val from source A, test = all of source B ("different lab")
Output: one H x W for all sources; sources whose (downscaled) sizes differ need --crop/--size or --resize.
Site numbers are normalised to 1-based (the source's smallest site number is its base) [U per source].
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np

from . import jump_images, jump_load_data, jump_meta, raw_io
from .errors import DatasetError, StorageError
from .ingest_common import INGEST_VERSION, Adapter, BadItems, IngestPlan, check_choice, scheme
from .raw_io import DecodeError, Geometry
from .shards import make_table

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
DEFAULTS = {
    "src": "s3://cellpainting-gallery/cpg0016-jump", "sources": None, "metadata": None, "moa": None,
    "plate_types": ["COMPOUND"], "exclude_batches": list(jump_meta.CSARMBN_EXCLUDED_BATCHES), "illum": False,
    "downscale": 2, "resize": None, "crop": None, "channels": list(CHANNELS), "classes": sorted(jump_meta.POSCONS),
    "compounds": "poscon", "label_by": "compound", "min_position_images": 36, "folds": 5, "val_fraction": 0.15,
    "split_seed": 0, "path_map": [], "cell_type": "U2OS",
}


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def _labels(cfg: dict, compounds: set[str], moa: dict[str, dict], dropped: dict) -> tuple[list[str], dict]:
    """classes and {JCP2022 id: label} for every labelled compound (unlabelled kept compounds map to -1)."""
    if cfg["label_by"] == "compound":
        classes = list(cfg["classes"])
        return classes, {c: (classes.index(c) if c in classes else -1) for c in compounds}
    single = {}
    for c in sorted(compounds):
        moas = moa.get(c, {}).get("moa", [])
        if len(moas) == 1:
            single[c] = moas[0]
        else:
            dropped["multi-label MoA (label_by=moa)" if moas else "no MoA annotation (label_by=moa)"].add(c)
    classes = sorted(set(single.values()))
    return classes, {c: classes.index(m) for c, m in single.items()}


def _annotations(cfg: dict, moa: dict[str, dict]) -> dict:
    return {c: {"name": (moa.get(c) or {}).get("name") or jump_meta.POSCONS.get(c),
                "moa": (moa.get(c) or {}).get("moa", [])} for c in cfg["classes"]}


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def _val_split(plates: list[dict], cfg: dict, salt: str) -> set[str]:
    """Plates held out for validation: ceil(val_fraction) of the training batches (seeded shuffle)."""
    rng = random.Random(f"{cfg['split_seed']}:{salt}")
    batches = sorted({p["batch"] for p in plates})
    if len(batches) >= 2:
        rng.shuffle(batches)
        chosen = set(batches[:max(1, math.ceil(cfg["val_fraction"] * len(batches)))])
        return {p["plate"] for p in plates if p["batch"] in chosen}
    names = sorted(p["plate"] for p in plates)
    if len(names) < 2:
        return set()
    rng.shuffle(names)
    return set(names[:max(1, math.ceil(cfg["val_fraction"] * len(names)))])


def _folds(plates: list[dict], k: int) -> list[list[str]]:
    """GroupKFold-like and deterministic: largest plate first, each into the fold with fewest images."""
    sizes, folds = [0] * k, [[] for _ in range(k)]
    for p in sorted(plates, key=lambda p: (-p["n"], p["plate"])):
        f = int(np.argmin(sizes))
        folds[f].append(p["plate"])
        sizes[f] += p["n"]
    return [sorted(f) for f in folds]


def _plate_scheme(desc: str, train: list[dict], test: list[str], cfg: dict, salt: str, notes: list):
    val = _val_split(train, cfg, salt)
    if not val or len(val) == len(train):
        notes.append(f"{salt}: not built (too few training plates/batches for a validation split)")
        return None
    tr = sorted(p["plate"] for p in train if p["plate"] not in val)
    return scheme(desc, {"train": {"column": "plate", "in": tr}, "val": {"column": "plate", "in": sorted(val)},
                         "test": {"column": "plate", "in": sorted(test)}}, "val", "held-out-train-batches")


def split_schemes(plates: list[dict], cfg: dict) -> tuple[dict, list[str]]:
    schemes, notes = {}, []
    by_source = defaultdict(list)
    for p in plates:
        by_source[p["source"]].append(p)
    for src in sorted(by_source):
        k = min(cfg["folds"], len(by_source[src]))
        if k < 2:
            notes.append(f"plate-folds-{src}: not built (fewer than 2 plates)")
            continue
        for i, fold in enumerate(_folds(by_source[src], k)):
            name = f"plate-folds-{src}-{i}"
            train = [p for p in by_source[src] if p["plate"] not in fold]
            s = _plate_scheme(f"{src}: plate-grouped fold {i} of {k} is test (new plates and batches of the same "
                              f"lab); val = held-out training batches", train, fold, cfg, name, notes)
            if s:
                schemes[name] = s
    for a in sorted(by_source):
        for b in sorted(by_source):
            if a != b:
                name = f"source-to-source-{a}-to-{b}"
                s = _plate_scheme(f"train on {a}, test on every plate of {b} (a different lab); val = held-out "
                                  f"batches of {a}", by_source[a], [p["plate"] for p in by_source[b]], cfg,
                                  name, notes)
                if s:
                    schemes[name] = s
    if not schemes:
        raise DatasetError(f"jump-cp: no split scheme can be built from {len(plates)} plate(s) ({'; '.join(notes)})")
    return schemes, notes


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
def _check(cfg: dict) -> None:
    if not cfg["sources"] or not cfg["metadata"]:
        raise DatasetError("ingest jump-cp: --sources and --metadata are required")
    check_choice(cfg["compounds"], ("poscon", "all"), "ingest jump-cp: compounds")
    check_choice(cfg["label_by"], ("compound", "moa"), "ingest jump-cp: label_by")
    if cfg["label_by"] == "moa" and not cfg["moa"]:
        raise DatasetError("ingest jump-cp: --label-by moa needs --moa (a MoA table URL)")
    if not isinstance(cfg["downscale"], int) or cfg["downscale"] < 1:
        raise DatasetError(f"ingest jump-cp: --downscale must be a positive integer, got {cfg['downscale']!r}")
    bad_ch = [c for c in cfg["channels"] if not c or "/" in c]
    if bad_ch or not cfg["channels"]:
        raise DatasetError(f"ingest jump-cp: bad channel names {cfg['channels']}")


def plan_jump(cfg: dict, *, src_options, skip_bad: bool, pmap=map) -> IngestPlan:
    _check(cfg)
    bad = BadItems([] if skip_bad else None)
    src, meta_dir = str(cfg["src"]).rstrip("/"), str(cfg["metadata"]).rstrip("/")
    plates, known, dropped_plates = jump_meta.read_plates(meta_dir, src_options, list(cfg["sources"]),
                                                          list(cfg["plate_types"]), list(cfg["exclude_batches"]))
    wells = jump_meta.read_wells(meta_dir, src_options, plates)
    path_map = [list(x.split("=", 1)) if isinstance(x, str) else list(x) for x in cfg["path_map"]]
    specs = [{"source": p["source"], "batch": p["batch"], "plate": p["plate"], "illum": cfg["illum"],
              "folder": jump_load_data.folder(src, p["source"], p["batch"], p["plate"]),
              "channels": list(cfg["channels"]), "path_map": path_map, "options": src_options} for p in plates]
    scans = {s["plate"]: s for s in pmap(jump_load_data.scan, specs)}

    dropped: dict[str, set] = defaultdict(set)
    site_counts: dict = defaultdict(int)  # (source, compound, well) -> sites, for the position filter
    kept_compounds, entries = set(), []
    for p in plates:
        sc = scans[p["plate"]]
        if sc["error"]:
            raise (StorageError if sc["error_type"] == "StorageError" else DatasetError)(sc["error"])
        if sc["missing"]:
            bad.bad(f"plate {p['source']}/{p['plate']}", sc["missing"]["file"], sc["missing"]["reason"])
            continue
        for prob in sc["problems"]:
            where = ("which is not in plate.csv.gz" if prob["plate"] not in known.get(prob["source"], ())
                     else f"but this is the load_data of {p['source']}/{p['plate']}")
            bad.bad(prob["item"], prob["file"], f"load_data row lists plate {prob['source']}/{prob['plate']}, {where}")
        wmap = wells.get((p["source"], p["plate"]), {})
        plate_wells = {}
        for w, n in sc["wells"].items():
            jcp = wmap.get(w)
            if jcp is None or jcp in (jump_meta.EMPTY, jump_meta.UNKNOWN):
                dropped[{None: "no well metadata", jump_meta.EMPTY: "empty well",
                         jump_meta.UNKNOWN: "unknown treatment"}[jcp]].add(f"{p['plate']}/{w}")
                continue
            if jcp != jump_meta.DMSO and cfg["compounds"] == "poscon" and jcp not in cfg["classes"]:
                continue  # other compounds are not part of the protocol; not counted as dropped
            plate_wells[w] = jcp
            if jcp != jump_meta.DMSO:
                kept_compounds.add(jcp)
                site_counts[(p["source"], jcp, w)] += n
        entries.append({**p, "scan": sc, "wells_jcp": plate_wells})

    moa = jump_meta.read_moa(cfg["moa"], src_options, meta_dir, kept_compounds | set(cfg["classes"])) \
        if cfg["moa"] else {}
    classes, label_of = _labels(cfg, kept_compounds, moa, dropped)
    if not classes:
        raise DatasetError("jump-cp: no classes (no class compound found on the chosen plates)")
    small = {k for k, n in site_counts.items() if n <= cfg["min_position_images"] and label_of.get(k[1], -1) >= 0}
    out_plates, bases = [], {}
    for e in entries:
        sc, src_name = e["scan"], e["source"]
        wmap = {}
        for w, jcp in e["wells_jcp"].items():
            if jcp == jump_meta.DMSO:
                wmap[w] = [jcp, -1, True]
            elif jcp in label_of and (src_name, jcp, w) not in small:
                wmap[w] = [jcp, label_of[jcp], False]
            elif (src_name, jcp, w) in small:
                dropped[f"position with <= {cfg['min_position_images']} images"].add(f"{e['plate']}/{w}")
        if not wmap:
            dropped["plate without kept wells"].add(e["plate"])
            continue
        if sc["site_min"] is not None:
            bases[src_name] = min(bases.get(src_name, sc["site_min"]), sc["site_min"])
        out_plates.append({"plate": e["plate"], "source": src_name, "batch": e["batch"],
                           "cell_type": cfg["cell_type"], "load_data": sc["load_data"], "wells": wmap,
                           "n": sum(sc["wells"][w] for w in wmap), "probe": sc["probe"]})
    if not out_plates:
        raise DatasetError(f"jump-cp: no plate has wells to ingest ({dict((k, len(v)) for k, v in dropped.items())})")

    geometry = Geometry.from_options(cfg["resize"], cfg["crop"])
    native, (h, w) = _probe_sizes(out_plates, cfg, src_options, geometry)
    for p in out_plates:
        p["site_base"] = bases.get(p["source"], 1)
        p.pop("probe")
    schemes, notes = split_schemes(out_plates, cfg)
    settings = {"channels": list(cfg["channels"]), "illum": cfg["illum"], "downscale": cfg["downscale"],
                "geometry": geometry.describe(), "native": native, "path_map": path_map}
    provenance = {
        "adapter": "jump-cp", "src": src, "metadata": meta_dir, "moa": cfg["moa"], "ingest_version": INGEST_VERSION,
        "options": {k: v for k, v in cfg.items() if k not in ("src", "metadata", "moa")},
        "native_sizes": native, "site_base": bases, "class_annotations": _annotations(cfg, moa)
        if cfg["label_by"] == "compound" else {}, "plates_left_out": dropped_plates,
        "dropped": {k: len(v) for k, v in sorted(dropped.items())},
        "preprocessing": "CS-ARM-BN: (illum) -> x1/downscale nearest -> clip at top 0.01% -> uint8; then geometry",
        "unverified": ["illumination correction by division [U]", "pyvips nearest pixel choice [U]",
                       "site numbering base per source [U]"], "split_notes": notes,
    }
    return IngestPlan(
        adapter="jump-cp", name="jump-cp-moa", version=f"cpg0016-{'+'.join(sorted(cfg['sources']))}",
        channels=list(cfg["channels"]), height=h, width=w, dtype="uint8", classes=classes,
        negative_control={"description": "DMSO wells (JCP2022_033924)", "column": "perturbation",
                          "values": [jump_meta.DMSO]},
        split_schemes=schemes, plates=out_plates, settings=settings, provenance=provenance,
        skipped=bad.skipped or [], src_options=src_options)


def _probe_sizes(plates: list[dict], cfg: dict, options, geometry: Geometry) -> tuple[dict, tuple[int, int]]:
    """Per source: native H, W and dtype of its first image; the common output size."""
    native, out = {}, {}
    for p in plates:
        if p["source"] in native or not p["probe"]:
            continue
        url = p["probe"][cfg["channels"][0]]
        try:
            arr = raw_io.decode_tiff(raw_io.read_bytes(url, options, "image"))
        except DecodeError as exc:
            raise DatasetError(f"{url}: {exc}") from None
        if arr.dtype.kind != "u":
            raise DatasetError(f"{url}: image dtype {arr.dtype}; expected unsigned integer TIFFs (JUMP: uint16)")
        native[p["source"]] = {"height": int(arr.shape[0]), "width": int(arr.shape[1]), "dtype": str(arr.dtype)}
        small = jump_images.downscaled_shape(arr.shape[0], arr.shape[1], cfg["downscale"])
        out[p["source"]] = geometry.out_shape(*small, where=f"{p['source']} (after downscale x1/{cfg['downscale']})")
    if len(set(out.values())) > 1:
        sizes = ", ".join(f"{s} {hw[0]}x{hw[1]}" for s, hw in sorted(out.items()))
        raise DatasetError(f"jump-cp: sources have different image sizes after downscale x1/{cfg['downscale']} "
                           f"({sizes}); pass --size N (centre crop) or --resize N for one common size")
    return native, next(iter(out.values()))


# ---------------------------------------------------------------------------------------------
# one plate
# ---------------------------------------------------------------------------------------------
def load_jump(plan: IngestPlan, plate: dict, skipped: list | None):
    s, opts = plan.settings, plan.src_options
    bad = BadItems(skipped, plate["plate"])
    native = s["native"][plate["source"]]
    shape, dtype = (native["height"], native["width"]), np.dtype(native["dtype"])
    geometry, factor = Geometry(**s["geometry"]), s["downscale"]
    ld_url, rows = jump_load_data.plate_rows(plate, s, opts)
    c = len(s["channels"])
    seen, todo = set(), []
    for r in rows:
        key = (r["well"], r["site"])
        item = f"{plate['plate']} well {r['well']} site {r['site']}"
        if key in seen:
            bad.bad(item, ld_url, "the same well and site appear twice")
        elif None in r["urls"] or (r["illum"] is not None and None in r["illum"]):
            bad.bad(item, ld_url, "a channel (or illumination) file name is empty")
        else:
            seen.add(key)
            todo.append(r)
    illum = _illum_functions(todo, opts) if s["illum"] else {}
    images = np.zeros((len(todo), c, plan.height, plan.width), dtype=np.uint8)
    ok = np.ones(len(todo), dtype=bool)
    flat = [u for r in todo for u in r["urls"]]
    for k, (url, value) in enumerate(raw_io.fetch_many(flat, opts)):
        i, ch = divmod(k, c)
        if not ok[i]:
            continue
        reason = raw_io.missing_or_error(url, value)
        if reason is None:
            try:
                arr = raw_io.decode_tiff(value)
                if arr.dtype != dtype or arr.shape != shape:
                    raise DecodeError(f"image is {arr.shape[0]}x{arr.shape[1]} {arr.dtype}, expected "
                                      f"{shape[0]}x{shape[1]} {dtype} like the rest of {plate['source']}")
                fn = illum.get(todo[i]["illum"][ch]) if s["illum"] else None
                if isinstance(fn, str):
                    raise DecodeError(fn)
                images[i, ch] = geometry.apply(jump_images.channel_to_uint8(arr, factor=factor, illum=fn))
            except DecodeError as exc:
                reason = str(exc)
        if reason is not None:
            ok[i] = False
            r = todo[i]
            bad.bad(f"{plate['plate']} well {r['well']} site {r['site']} channel {s['channels'][ch]}", url,
                    f"{reason} (load_data {ld_url} row {r['row']})")
    keep = [r for r, good in zip(todo, ok) if good]
    base = plate["site_base"]
    sites = [r["site"] - base + 1 for r in keep]
    n = len(keep)
    meta = {
        "image_id": [f"{plate['source']}_{plate['batch']}_{plate['plate']}_{r['well']}_{st}"
                     for r, st in zip(keep, sites)],
        "source": [plate["source"]] * n, "batch": [plate["batch"]] * n, "plate": [plate["plate"]] * n,
        "well": [r["well"] for r in keep], "site": sites, "cell_type": [plate["cell_type"]] * n,
        "perturbation": [plate["wells"][r["well"]][0] for r in keep],
        "label": [plate["wells"][r["well"]][1] for r in keep],
        "is_control": [plate["wells"][r["well"]][2] for r in keep],
    }
    return make_table(meta, images if ok.all() else images[ok], plan.extra_columns)  # no copy when all good


def _illum_functions(rows: list[dict], opts) -> dict:
    """URL -> array (or the reason it is unusable); one file per plate and channel, read once."""
    urls = sorted({u for r in rows for u in r["illum"]})
    out = {}
    for url, value in raw_io.fetch_many(urls, opts):
        reason = raw_io.missing_or_error(url, value)
        if reason:
            out[url] = f"illumination function {url}: {reason}"
            continue
        try:
            out[url] = jump_images.load_illum(value)
        except DecodeError as exc:
            out[url] = f"{url}: {exc}"
    return out


ADAPTER = Adapter(
    name="jump-cp", description="JUMP-CP cpg0016: load_data + 16-bit channel TIFFs, CS-ARM-BN MoA protocol",
    defaults=DEFAULTS, plan_fn=plan_jump, load_fn=load_jump)
