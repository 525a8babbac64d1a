"""Small, format-faithful raw layouts for ingestion tests (the layouts the README's Datasets section describes).

- RxRx1: metadata.csv (11 columns) + 6 grayscale 8-bit PNGs per site; two cell types, controls, both sites.
- RxRx1-WILDS: rxrx1_v1.0/RELEASE_v1.0.txt + metadata.csv (dataset train/val/test) + RGB PNGs, contiguous
  sirna_id.
- JUMP: a `cellpainting-gallery` bucket on the moto server holding two sources whose images differ in size
  and site base, load_data as parquet (source_3, PathName with trailing slash, illum columns) and csv.gz
  (source_8, PathName without slash; one plate with URL_Orig columns), uint16 TIFFs and illum .npy files;
  plus local metadata tables (plate/well/compound) with DMSO, an empty well and a well without metadata,
  and a MoA table with a pipe-delimited multi-label row.
Builders return what the tests need to compute expected rows and pixels independently.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RXRX1_COLUMNS = ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type",
                 "sirna", "sirna_id"]


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _write_csv(path: Path, columns: list[str], rows: list[dict], gz: bool = False, delimiter: str = ",") -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


# well -> (well_type, sirna_id); sirna names are derived from the id
_RXRX1_WELLS = [("B02", "treatment", 0), ("B03", "treatment", 1), ("B04", "treatment", 2),
                ("C02", "positive_control", 3), ("C03", "negative_control", 4)]


def _sirna(i: int, well_type: str) -> str:
    return "EMPTY" if well_type == "negative_control" else f"s{1000 + i}"


def _rxrx_rows(experiments: dict[str, str], plates: dict[str, list[int]], wells) -> list[dict]:
    rows = []
    for exp, dataset in experiments.items():
        for plate in plates.get(exp, [1]):
            for well, well_type, sid in wells(exp):
                for site in (1, 2):
                    rows.append({"site_id": f"{exp}_{plate}_{well}_{site}", "well_id": f"{exp}_{plate}_{well}",
                                 "cell_type": exp.split("-")[0], "dataset": dataset, "experiment": exp,
                                 "plate": plate, "well": well, "site": site, "well_type": well_type,
                                 "sirna": _sirna(sid, well_type), "sirna_id": sid})
    return rows


def build_rxrx1(root: Path, size: int = 16, seed: int = 0) -> dict:
    """HEPG2 and U2OS; experiments 01-02 train, 03 test; HEPG2-01 has two plates."""
    rng = np.random.default_rng(seed)
    experiments = {"HEPG2-01": "train", "HEPG2-02": "train", "HEPG2-03": "test",
                   "U2OS-01": "train", "U2OS-02": "train", "U2OS-03": "test"}
    rows = _rxrx_rows(experiments, {"HEPG2-01": [1, 2]}, lambda exp: _RXRX1_WELLS)
    pixels = {}
    for r in rows:
        stack = rng.integers(0, 256, (6, size, size), dtype=np.uint8)
        for ch in range(6):
            _png(root / "images" / r["experiment"] / f"Plate{r['plate']}" / f"{r['well']}_s{r['site']}_w{ch + 1}.png",
                 stack[ch])
        pixels[r["site_id"]] = stack
    _write_csv(root / "metadata.csv", RXRX1_COLUMNS, rows)
    return {"root": root, "rows": rows, "pixels": pixels, "size": size}


def build_wilds(root: Path, size: int = 12, seed: int = 1, nest: bool = True) -> dict:
    """`root/rxrx1_v1.0/` (or root itself when nest=False). HEPG2: train 01-03, val 04, test 05;
    U2OS: train 01-03, val 04, test 05-06. sirna_id 0..5 all present."""
    rng = np.random.default_rng(seed)
    folder = root / "rxrx1_v1.0" if nest else root
    experiments = {}
    for t, (n_train, n_val, n_test) in {"HEPG2": (3, 1, 1), "U2OS": (3, 1, 2)}.items():
        names = [f"{t}-{i:02}" for i in range(1, n_train + n_val + n_test + 1)]
        for i, e in enumerate(names):
            experiments[e] = "train" if i < n_train else "val" if i < n_train + n_val else "test"

    def wells(exp):
        k = int(exp.split("-")[1])
        return [("B02", "treatment", k % 4), ("B03", "treatment", (k + 1) % 4),
                ("C02", "positive_control", 4), ("C03", "negative_control", 5)]

    rows = _rxrx_rows(experiments, {}, wells)
    pixels = {}
    for r in rows:
        rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        _png(folder / "images" / r["experiment"] / f"Plate{r['plate']}" / f"{r['well']}_s{r['site']}.png", rgb)
        pixels[r["site_id"]] = np.moveaxis(rgb, -1, 0)
    _write_csv(folder / "metadata.csv", RXRX1_COLUMNS, rows)
    (folder / "RELEASE_v1.0.txt").write_text("RxRx1-WILDS v1.0 (test fixture)\n")
    return {"root": root, "folder": folder, "rows": rows, "pixels": pixels, "size": size}


# ---------------------------------------------------------------------------------------------
# JUMP
# ---------------------------------------------------------------------------------------------
BUCKET = "cellpainting-gallery"
PREFIX = "cpg0016-jump"
JUMP_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
DMSO, EMPTY = "JCP2022_033924", "JCP2022_999999"
C0, C1, C2 = "JCP2022_012818", "JCP2022_025848", "JCP2022_050797"  # poscons (quinidine = multi-MoA row)
OTHER = "JCP2022_000001"
# plate -> (source, batch, plate type, written to S3?)
JUMP_PLATES = {
    "P301": ("source_3", "B1", "COMPOUND"), "P302": ("source_3", "B1", "COMPOUND"),
    "P303": ("source_3", "B2", "COMPOUND"), "P304": ("source_3", "CP_33_all_Phenix1", "COMPOUND"),
    "P305": ("source_3", "B1", "TARGET2"),
    "Q801": ("source_8", "J1", "COMPOUND"), "Q802": ("source_8", "J1", "COMPOUND"),
    "Q803": ("source_8", "J2", "COMPOUND"),
    "R401": ("source_4", "X1", "COMPOUND"),
}
# well -> compound; A05 empty, A06 has images but no well metadata
JUMP_WELLS = {"A01": DMSO, "A02": C0, "A03": C1, "A04": OTHER, "A05": EMPTY}
JUMP_SOURCES = {"source_3": {"size": 24, "site_base": 0}, "source_8": {"size": 20, "site_base": 1}}


def _plate_wells(plate: str) -> dict[str, str]:
    wells = dict(JUMP_WELLS)
    if plate.startswith("Q"):
        wells["A03"] = C2  # quinidine only in source_8
    return wells


def _tiff(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def build_jump(s3, meta_dir: Path, prefix: str = PREFIX, seed: int = 2,
               image_wells=("A01", "A02", "A03", "A04", "A05", "A06"), uploaded_wells=("A01", "A02", "A03")) -> dict:
    """Upload under s3://cellpainting-gallery/<prefix>/ through the boto3 client `s3` (objects public-read;
    the bucket must exist) and write the metadata tables to `meta_dir`. Returns raw arrays by URL and the
    load_data rows per plate."""
    rng = np.random.default_rng(seed)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(8)  # boto3 clients are thread-safe; uploads dominate the fixture's cost
    pending = []

    def put(key: str, data: bytes) -> None:
        pending.append(pool.submit(s3.put_object, Bucket=BUCKET, Key=key, Body=data, ACL="public-read"))

    raw, illum, sites = {}, {}, {}
    for plate, (source, batch, ptype) in JUMP_PLATES.items():
        if source not in JUMP_SOURCES or ptype != "COMPOUND" or batch.startswith("CP_33"):
            continue
        size, base = JUMP_SOURCES[source]["size"], JUMP_SOURCES[source]["site_base"]
        img_dir = f"{prefix}/{source}/images/{batch}/images/{plate}__2021-05-02T16_02_51-Measurement1/Images"
        illum_dir = f"{prefix}/{source}/images/{batch}/illum/{plate}"
        rows = []
        for ch in JUMP_CHANNELS:
            fn = (1.0 + 0.5 * rng.random((size, size))).astype(np.float32)
            b = io.BytesIO()
            np.save(b, fn)
            put(f"{illum_dir}/{plate}_Illum{ch}.npy", b.getvalue())
            illum[f"s3://{BUCKET}/{illum_dir}/{plate}_Illum{ch}.npy"] = fn
        for w in image_wells:
            for site in (base, base + 1):
                row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                       "Metadata_Well": w, "Metadata_Site": site}
                for k, ch in enumerate(JUMP_CHANNELS):
                    arr = rng.integers(0, 3000, (size, size), dtype=np.uint16)
                    arr[rng.integers(0, size), rng.integers(0, size)] = 60000  # a hot pixel the clip removes
                    name = f"{plate}_{w}_T0001F{site:03}L01A01Z01C{k + 1:02}.tif"
                    if w in uploaded_wells:  # other wells' rows exist in load_data but are never read
                        put(f"{img_dir}/{name}", _tiff(arr))
                    url = f"s3://{BUCKET}/{img_dir}/{name}"
                    raw[url] = arr
                    row[f"FileName_Orig{ch}"] = name
                    row[f"PathName_Orig{ch}"] = f"s3://{BUCKET}/{img_dir}" + ("/" if source == "source_3" else "")
                    row[f"URL_Orig{ch}"] = url
                    row[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
                    row[f"PathName_Illum{ch}"] = f"s3://{BUCKET}/{illum_dir}"
                rows.append(row)
        sites[plate] = rows
    for f in pending:
        f.result()
    pool.shutdown()
    write_load_data(s3, prefix, sites)
    plate_rows = [{"Metadata_Source": s, "Metadata_Batch": b, "Metadata_Plate": p, "Metadata_PlateType": t}
                  for p, (s, b, t) in JUMP_PLATES.items()]
    _write_csv(meta_dir / "plate.csv.gz", list(plate_rows[0]), plate_rows, gz=True)
    well_rows = [{"Metadata_Source": s, "Metadata_Plate": p, "Metadata_Well": w, "Metadata_JCP2022": j}
                 for p, (s, _, _) in JUMP_PLATES.items() for w, j in _plate_wells(p).items()]
    _write_csv(meta_dir / "well.csv.gz", list(well_rows[0]), well_rows, gz=True)
    compounds = [DMSO, C0, C1, C2, OTHER, "JCP2022_037716"]
    _write_csv(meta_dir / "compound.csv.gz", ["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_SMILES"],
               [{"Metadata_JCP2022": c, "Metadata_InChIKey": f"KEY{c[-6:]}-XXXX", "Metadata_SMILES": "C"}
                for c in compounds], gz=True)
    moa = [{"Metadata_InChIKey": f"KEY{C0[-6:]}-XXXX", "Metadata_pert_iname": "TC-S-7004", "Metadata_moa":
            "DYRK inhibitor"},
           {"Metadata_InChIKey": f"KEY{C1[-6:]}-XXXX", "Metadata_pert_iname": "dexamethasone", "Metadata_moa":
            "glucocorticoid receptor agonist"},
           {"Metadata_InChIKey": f"KEY{C2[-6:]}-XXXX", "Metadata_pert_iname": "quinidine", "Metadata_moa":
            "potassium channel blocker|sodium channel blocker"},
           {"Metadata_InChIKey": f"KEY{OTHER[-6:]}-XXXX", "Metadata_pert_iname": "other", "Metadata_moa":
            "DYRK inhibitor"}]
    moa_path = meta_dir / "compound_rephub_annot.csv.gz"
    _write_csv(moa_path, ["Metadata_InChIKey", "Metadata_pert_iname", "Metadata_clinical_phase", "Metadata_moa",
                          "Metadata_target"], [{**m, "Metadata_clinical_phase": "", "Metadata_target": ""}
                                               for m in moa], gz=True)
    return {"raw": raw, "illum": illum, "sites": sites, "meta_dir": meta_dir, "moa": moa_path,
            "src": f"s3://{BUCKET}/{prefix}", "prefix": prefix}


def write_load_data(s3, prefix: str, sites: dict[str, list[dict]]) -> None:
    """load_data files under s3://cellpainting-gallery/<prefix>/: source_3 as parquet with illum columns
    (PathName/FileName form), source_8 as csv.gz without illum (Q803 in the URL_Orig form). Image URLs
    inside may point anywhere (tests reuse one set of images under new load_data)."""
    for plate, rows in sites.items():
        source, batch, _ = JUMP_PLATES.get(plate, (rows[0]["Metadata_Source"], rows[0]["Metadata_Batch"], ""))
        ld = f"{prefix}/{source}/workspace/load_data_csv/{batch}/{plate}"
        if source == "source_3":
            cols = [c for c in rows[0] if not c.startswith("URL_")]
            b = io.BytesIO()
            pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), b)
            s3.put_object(Bucket=BUCKET, Key=f"{ld}/load_data_with_illum.parquet", Body=b.getvalue(),
                          ACL="public-read")
        else:
            url_form = plate == "Q803"
            cols = [c for c in rows[0] if "Illum" not in c and (c.startswith("URL_") == url_form
                                                                 or c.startswith("Metadata_"))]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            s3.put_object(Bucket=BUCKET, Key=f"{ld}/load_data.csv.gz", Body=gzip.compress(buf.getvalue().encode()),
                          ACL="public-read")


def jump_expected(raw: np.ndarray, factor: int = 2, crop: int | None = None, illum: np.ndarray | None = None
                  ) -> np.ndarray:
    """Independent re-statement of the CS-ARM-BN 8-bit conversion for one channel."""
    img = raw.astype(np.float64) if illum is None else raw.astype(np.float64) / illum.astype(np.float64)
    img = img[::factor, ::factor]
    n = max(1, int(round(img.size * 1e-4)))
    thr = np.sort(img, axis=None)[-n]
    out = np.minimum(img * (255.0 / thr), 255).astype(np.uint8)  # 255/thr first, as CS-ARM-BN (truncates)
    if crop:
        top, left = (out.shape[0] - crop) // 2, (out.shape[1] - crop) // 2
        out = out[top:top + crop, left:left + crop]
    return out
