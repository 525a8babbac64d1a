"""RxRx1-WILDS (wilds 2.0.0, dataset version 1.0) -> plate shards, with the WILDS split schemes as predicates.

Layout: `<root>/rxrx1_v1.0/{RELEASE_v1.0.txt, metadata.csv,
images/<experiment>/Plate<p>/<well>_s<site>.png}`; images are 3-channel RGB 8-bit PNGs, 256x256.
`--src` may name the folder holding `rxrx1_v1.0/` or that folder itself; RELEASE_v1.0.txt must exist
(WILDS treats the data as present only then).

Splits, exactly as wilds/datasets/rxrx1_dataset.py assigns them (every predicate is also restricted to
the batches (= experiments) that can match, which changes no row but lets readers skip plates):
  official       train   = dataset 'train' and site != 2         val  = dataset 'val'
                 test    = dataset 'test'                        id_test = dataset 'train' and site == 2
  mixed-to-test  for each test experiment of cell type T (counted from the experiment name prefix, as
                 WILDS does), drop train experiment T-01, T-02, ... entirely; then
                 train = (dataset 'train' and site != 2) or (dataset 'test' and site == 1)
                 val   = dataset 'val';  test = dataset 'test' and site != 1
Labels: y = sirna_id, n_classes = max + 1, every id 0..max must occur (else an error naming the missing ids).
WILDS leaderboard rule kept in provenance: the standard track forbids batch statistics at test time.
"""

from __future__ import annotations

from collections import defaultdict

from . import raw_io
from .errors import DatasetError
from .ingest_common import INGEST_VERSION, Adapter, BadItems, IngestPlan, scheme, with_batches
from .raw_io import Geometry, url_join
from .rxrx1 import (
    EXTRA_COLUMNS,
    SOURCE,
    experiments_by_dataset,
    group_plates,
    labels_and_classes,
    load_plate_images,
    negative_control,
    probe_size,
    read_metadata,
)

FOLDER = "rxrx1_v1.0"
RELEASE = "RELEASE_v1.0.txt"
# [U] which three stains make R, G, B; the RxRx1-WILDS README says the first three of six (w1-w3).
CHANNELS = ["R", "G", "B"]
NEGATIVE_CONTROL_ID = 1138  # WILDS docstring: 0-1107 treatments, 1108-1137 positive controls, 1138 negative
TEST_TIME_RULE = ("WILDS standard track: no test data for training or model selection, selection on the official "
                  "OOD val split only, and no batch statistics at evaluation time (BatchNorm frozen at eval); "
                  "test-time adaptation belongs on the separate non-standard track")


def resolve_root(src: str, options) -> str:
    src = str(src).rstrip("/")
    for root in (src, url_join(src, FOLDER)):
        if raw_io.exists(url_join(root, RELEASE), options):
            return root
    raise DatasetError(f"{src}: no {RELEASE} in it or in {FOLDER}/ (is this the RxRx1-WILDS v1.0 folder? "
                       f"wilds marks a complete download with that file)")


def _derive(row: dict) -> dict:
    """The WILDS loader reads only 7 columns; the other RxRx1 columns are believed present [S]. Fill any
    that are absent from the ones it does read (recorded in provenance)."""
    if "site_id" not in row:
        row["site_id"] = f"{row.get('experiment')}_{row.get('plate')}_{row.get('well')}_{row.get('site')}"
    if "sirna" not in row:
        row["sirna"] = str(row.get("sirna_id"))
    if "well_type" not in row:
        try:
            row["well_type"] = "negative_control" if int(row.get("sirna_id")) == NEGATIVE_CONTROL_ID else "treatment"
        except (TypeError, ValueError):
            row["well_type"] = "treatment"
    return row


def _files(root: str, plate: dict, i: int) -> list[str]:
    r = plate["rows"]
    return [url_join(root, f"images/{plate['experiment']}/Plate{plate['plate_number']}/"
                           f"{r['well'][i]}_s{r['site'][i]}.png")]


def split_schemes(rows: list[dict], url: str) -> dict:
    by_ds = experiments_by_dataset(rows)
    train_e, val_e, test_e = (by_ds.get(k, set()) for k in ("train", "val", "test"))
    ds = lambda v: {"column": "dataset", "eq": v}  # noqa: E731
    site = lambda op, v: {"column": "site", op: v}  # noqa: E731
    official = scheme(
        "RxRx1-WILDS official: train = 33 train experiments site 1; val (OOD) = 4 experiments; test (OOD) = 14 "
        "experiments; id_test = train experiments site 2",
        {"train": with_batches({"all": [ds("train"), site("ne", 2)]}, train_e),
         "val": with_batches(ds("val"), val_e),
         "test": with_batches(ds("test"), test_e),
         "id_test": with_batches({"all": [ds("train"), site("eq", 2)]}, train_e)},
        "val", "official-ood-validation")

    counts: dict[str, int] = defaultdict(int)
    for e in sorted(test_e):
        counts[e.split("-")[0]] += 1
    discard = [f"{t}-{n:02}" for t, c in sorted(counts.items()) for n in range(1, c + 1)]
    absent = [e for e in discard if e not in train_e]
    if absent:
        raise DatasetError(f"{url}: split scheme mixed-to-test drops train experiments {absent}, which are not "
                           f"train experiments (WILDS expects experiment names <CELLTYPE>-<NN> numbered from 01)")
    keep = {"column": "batch", "not_in": discard}
    mixed = scheme(
        "RxRx1-WILDS mixed-to-test: train = site 1 of the test experiments + site 1 of the train experiments "
        f"minus {', '.join(discard)}; val = official val; test = site 2 of the test experiments",
        {"train": with_batches({"all": [keep, {"any": [{"all": [ds("train"), site("ne", 2)]},
                                                       {"all": [ds("test"), site("eq", 1)]}]}]},
                               (train_e | test_e) - set(discard)),
         "val": with_batches({"all": [keep, ds("val")]}, val_e - set(discard)),
         "test": with_batches({"all": [keep, ds("test"), site("ne", 1)]}, test_e - set(discard))},
        "val", "official-ood-validation")
    return {"official": official, "mixed-to-test": mixed}


def plan_wilds(config: dict, *, src_options, skip_bad: bool, pmap=map) -> IngestPlan:
    root = resolve_root(config["src"], src_options)
    url = url_join(root, "metadata.csv")
    table = raw_io.read_table(url, src_options)
    derived = [c for c in ("site_id", "sirna", "well_type") if c not in table.column_names]
    bad = BadItems([] if skip_bad else None)
    rows = read_metadata(url, src_options, datasets=("train", "val", "test"), bad=bad, derive=_derive, table=table)
    classes = labels_and_classes(rows, url)
    plates = group_plates(rows, url, bad)
    geometry = Geometry.from_options(config["resize"], config["crop"])
    native = probe_size(plates, _files, root, "RGB", src_options, bad)
    h, w = geometry.out_shape(*native, where=root)
    release = raw_io.read_bytes(url_join(root, RELEASE), src_options).decode("utf-8", "replace").strip()
    return IngestPlan(
        adapter="rxrx1-wilds", name="rxrx1-wilds", version="1.0", channels=list(CHANNELS), height=h, width=w,
        dtype="uint8", classes=classes, negative_control=negative_control(rows),
        split_schemes=split_schemes(rows, url), plates=plates, extra_columns=dict(EXTRA_COLUMNS),
        skipped=bad.skipped or [], src_options=src_options,
        settings={"root": root, "geometry": geometry.describe(), "native_size": list(native),
                  "negative_control_well_type": "negative_control"},
        provenance={"adapter": "rxrx1-wilds", "src": root, "metadata": url, "release_file": release[:200],
                    "rows": len(rows), "ingest_version": INGEST_VERSION, "native_size": list(native),
                    "geometry": geometry.describe(), "source": SOURCE,
                    "channels [U]": "RGB of the WILDS PNGs; README: first three RxRx1 stains (w1-w3)",
                    "derived_columns": {c: "absent from metadata.csv; derived (site_id from experiment/plate/well/"
                                           "site, sirna from sirna_id, well_type: sirna_id 1138 = negative control)"
                                        for c in derived},
                    "leaderboard_rules": TEST_TIME_RULE,
                    "splits": "as wilds/datasets/rxrx1_dataset.py (wilds 2.0.0) assigns them"})


def load_wilds(plan: IngestPlan, plate: dict, skipped: list | None):
    return load_plate_images(plan, plate, skipped, _files, "RGB")


ADAPTER = Adapter(
    name="rxrx1-wilds", description="RxRx1-WILDS v1.0: metadata.csv + one RGB 8-bit PNG per site",
    defaults={"src": None, "resize": None, "crop": None}, plan_fn=plan_wilds, load_fn=load_wilds)
