"""RxRx1 and RxRx1-WILDS ingestion (in-process executor; the Ray path is in test_ingest_job.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import open_dataset
from platebench.harness.prepare.ingest import run_ingest
from raw_fixtures import RXRX1_COLUMNS, build_rxrx1, build_wilds


@pytest.fixture(scope="module")
def rxrx1_fx(tmp_path_factory):
    return build_rxrx1(tmp_path_factory.mktemp("rxrx1") / "raw")


@pytest.fixture(scope="module")
def wilds_fx(tmp_path_factory):
    return build_wilds(tmp_path_factory.mktemp("wilds") / "raw")


def _copy(fx, tmp_path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(fx["root"], dst)
    return dst


def _ingest(name, src, out, **kw):
    cfg = {"src": str(src), **kw.pop("config", {})}
    return run_ingest(name, cfg, str(out), executor="local", progress=False, **kw)


def _rewrite_metadata(path: Path, edit) -> None:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RXRX1_COLUMNS)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# RxRx1
# ---------------------------------------------------------------------------------------------
def test_rxrx1_rows_labels_controls_and_pixels(rxrx1_fx, tmp_path):
    result = _ingest("rxrx1", rxrx1_fx["root"], tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    m = ds.manifest
    assert result["images"] == len(rxrx1_fx["rows"]) == m.rows
    assert m.channels == ["w1", "w2", "w3", "w4", "w5", "w6"] and (m.height, m.width) == (16, 16)
    assert m.classes == ["s1000", "s1001", "s1002", "s1003", "EMPTY"]  # index = sirna_id
    assert m.negative_control["values"] == ["EMPTY"]
    assert sorted(m.plates) == ["HEPG2-01_1", "HEPG2-01_2", "HEPG2-02_1", "HEPG2-03_1", "U2OS-01_1", "U2OS-02_1",
                                "U2OS-03_1"]
    by_id = {r["site_id"]: r for r in rxrx1_fx["rows"]}
    seen = set()
    for part in m.parts:
        table = ds.read_part(part, verify=True)
        images = ds.images(table)
        for row, img in zip(table.drop_columns(["image"]).to_pylist(), images):
            src = by_id[row["image_id"]]
            assert row["label"] == src["sirna_id"] and row["perturbation"] == src["sirna"]
            assert row["is_control"] == (src["well_type"] == "negative_control")
            assert (row["source"], row["batch"], row["cell_type"]) == ("recursion", src["experiment"],
                                                                       src["cell_type"])
            assert row["plate"] == f"{src['experiment']}_{src['plate']}" and row["site"] == src["site"]
            assert row["dataset"] == src["dataset"] and row["well_type"] == src["well_type"]
            np.testing.assert_array_equal(img, rxrx1_fx["pixels"][row["image_id"]])
            seen.add(row["image_id"])
    assert seen == set(by_id)


def test_rxrx1_official_split_never_selects_on_test(rxrx1_fx, tmp_path):
    _ingest("rxrx1", rxrx1_fx["root"], tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    sch = ds.manifest.scheme("official")
    assert sch.selection_split == "val" and set(sch.splits) == {"train", "val", "test"}

    def ids(split):
        return set(ds.split_metadata("official", split).column("image_id").to_pylist())

    rows = rxrx1_fx["rows"]
    exp = {
        "train": {r["site_id"] for r in rows if r["experiment"] in ("HEPG2-01", "U2OS-01")},
        "val": {r["site_id"] for r in rows if r["experiment"] in ("HEPG2-02", "U2OS-02")},  # last train exp per type
        "test": {r["site_id"] for r in rows if r["dataset"] == "test"},
    }
    for split, expected in exp.items():
        assert ids(split) == expected, split
    assert ds.manifest.plates_for("official", "test") == ["HEPG2-03_1", "U2OS-03_1"]  # pruned by batch


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_rxrx1_resize_and_crop(rxrx1_fx, tmp_path, mode):
    _ingest("rxrx1", rxrx1_fx["root"], tmp_path / "out", config={mode: 8})
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.manifest.image_shape == (6, 8, 8)
    table = ds.read_part(ds.manifest.parts[0])
    img, sid = ds.images(table)[0], table["image_id"][0].as_py()
    src = rxrx1_fx["pixels"][sid]
    if mode == "crop":
        np.testing.assert_array_equal(img, src[:, 4:12, 4:12])
    else:
        expected = np.stack([np.asarray(Image.fromarray(c).resize((8, 8), Image.Resampling.BILINEAR)) for c in src])
        np.testing.assert_array_equal(img, expected)


def _missing_channel(root: Path) -> str:
    path = root / "images/HEPG2-02/Plate1/B03_s2_w3.png"
    path.unlink()
    return str(path)


def _wrong_size(root: Path) -> str:
    path = root / "images/U2OS-01/Plate1/C02_s1_w5.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(path)
    return str(path)


def _wrong_dtype(root: Path) -> str:
    path = root / "images/U2OS-03/Plate1/B02_s1_w1.png"
    Image.fromarray(np.full((16, 16), 300, np.uint16)).save(path)  # a 16-bit grayscale PNG
    return str(path)


def _row_without_image(root: Path) -> str:
    extra = {"site_id": "HEPG2-02_1_D05_1", "well_id": "HEPG2-02_1_D05", "cell_type": "HEPG2", "dataset": "train",
             "experiment": "HEPG2-02", "plate": "1", "well": "D05", "site": "1", "well_type": "treatment",
             "sirna": "s1000", "sirna_id": "0"}
    _rewrite_metadata(root / "metadata.csv", lambda rows: rows + [extra])
    return str(root / "images/HEPG2-02/Plate1/D05_s1_w1.png")


@pytest.mark.parametrize("damage, words", [
    (_missing_channel, ["file is missing", "site_id=HEPG2-02_1_B03_2"]),
    (_wrong_size, ["20x20", "expected 16x16"]),
    (_wrong_dtype, ["I;16", "expected L"]),
    (_row_without_image, ["file is missing", "site_id=HEPG2-02_1_D05_1"]),
])
def test_rxrx1_bad_input_is_an_error_naming_the_file(rxrx1_fx, tmp_path, damage, words):
    root = _copy(rxrx1_fx, tmp_path)
    bad_file = damage(root)
    with pytest.raises(DatasetError) as err:
        _ingest("rxrx1", root, tmp_path / "out")
    assert bad_file in str(err.value)
    for w in words:
        assert w in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rxrx1_skip_bad_reports_every_skipped_item(rxrx1_fx, tmp_path):
    root = _copy(rxrx1_fx, tmp_path)
    bad = {_missing_channel(root), _wrong_size(root), _wrong_dtype(root)}
    result = _ingest("rxrx1", root, tmp_path / "out", skip_bad=True)
    assert result["skipped"] == 3 and result["images"] == len(rxrx1_fx["rows"]) - 3
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert report["count"] == 3 and {i["file"] for i in report["items"]} == bad
    assert all(i["reason"] and i["plate"] for i in report["items"])
    ds = open_dataset(str(tmp_path / "out"))
    ids = set(ds.metadata().column("image_id").to_pylist())
    assert "HEPG2-02_1_B03_2" not in ids and "U2OS-01_1_C02_1" not in ids and len(ids) == ds.manifest.rows
    assert ds.manifest.provenance["skipped_items"] == 3


def test_rxrx1_non_contiguous_labels_name_the_missing_ids(rxrx1_fx, tmp_path):
    root = _copy(rxrx1_fx, tmp_path)

    def edit(rows):
        for r in rows:
            if r["sirna_id"] == "2":
                r["sirna_id"] = "7"
        return rows

    _rewrite_metadata(root / "metadata.csv", edit)
    with pytest.raises(DatasetError, match=r"metadata\.csv.*sirna_id.*missing: 2, 5, 6"):
        _ingest("rxrx1", root, tmp_path / "out")


def test_unknown_option_is_an_error(rxrx1_fx, tmp_path):
    with pytest.raises(DatasetError, match="unknown option.*'sizee'"):
        _ingest("rxrx1", rxrx1_fx["root"], tmp_path / "out", config={"sizee": 3})


# ---------------------------------------------------------------------------------------------
# RxRx1-WILDS
# ---------------------------------------------------------------------------------------------
def wilds_expected(rows: list[dict]) -> dict[str, dict[str, set]]:
    """The WILDS split assignment restated from wilds/datasets/rxrx1_dataset.py, over the fixture rows."""
    official = {"train": set(), "val": set(), "test": set(), "id_test": set()}
    mixed = {"train": set(), "val": set(), "test": set()}
    test_exps = sorted({r["experiment"] for r in rows if r["dataset"] == "test"})
    counts: dict[str, int] = {}
    for e in test_exps:
        counts[e.split("-")[0]] = counts.get(e.split("-")[0], 0) + 1
    discard = {f"{t}-{n:02}" for t, c in counts.items() for n in range(1, c + 1)}
    for r in rows:
        sid, ds, site = r["site_id"], r["dataset"], int(r["site"])
        official["id_test" if ds == "train" and site == 2 else ds].add(sid)
        split = ds
        if ds == "train" and site == 2:
            split = None
        if ds == "test" and site == 1:
            split = "train"
        if r["experiment"] in discard:
            split = None
        if split:
            mixed[split].add(sid)
    return {"official": official, "mixed-to-test": mixed}


@pytest.mark.parametrize("nested", [True, False])
def test_wilds_split_lists_equal_the_wilds_splits(wilds_fx, tmp_path, nested):
    src = wilds_fx["root"] if nested else wilds_fx["folder"]  # the folder holding rxrx1_v1.0/, or it
    result = _ingest("rxrx1-wilds", src, tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    m = ds.manifest
    assert result["images"] == len(wilds_fx["rows"])
    assert set(m.split_schemes) == {"official", "mixed-to-test"}
    assert m.scheme("official").selection_split == "val"
    assert m.scheme("official").selection_rule == "official-ood-validation"
    expected = wilds_expected(wilds_fx["rows"])
    for scheme, splits in expected.items():
        assert set(m.scheme(scheme).splits) == set(splits)
        for split, ids in splits.items():
            got = ds.split_metadata(scheme, split).column("image_id").to_pylist()
            assert len(got) == len(set(got)) and set(got) == ids, (scheme, split)
    assert m.classes == ["s1000", "s1001", "s1002", "s1003", "s1004", "EMPTY"]
    assert "batch statistics" in m.provenance["leaderboard_rules"]


def test_wilds_images_are_rgb_channels(wilds_fx, tmp_path):
    _ingest("rxrx1-wilds", wilds_fx["root"], tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.manifest.image_shape == (3, 12, 12)
    table = ds.read_part(ds.manifest.parts[-1])
    for sid, img in zip(table["image_id"].to_pylist(), ds.images(table)):
        np.testing.assert_array_equal(img, wilds_fx["pixels"][sid])
    controls = table.filter(table["is_control"]).column("label").to_pylist()
    assert controls and set(controls) == {5}


def test_wilds_requires_release_file(wilds_fx, tmp_path):
    root = _copy(wilds_fx, tmp_path)
    (root / "rxrx1_v1.0" / "RELEASE_v1.0.txt").unlink()
    with pytest.raises(DatasetError, match="RELEASE_v1.0.txt"):
        _ingest("rxrx1-wilds", root, tmp_path / "out")


def test_wilds_non_contiguous_sirna_id_names_missing(wilds_fx, tmp_path):
    root = _copy(wilds_fx, tmp_path)

    def edit(rows):
        return [r for r in rows if r["sirna_id"] != "4"]  # drop every positive-control row

    _rewrite_metadata(root / "rxrx1_v1.0" / "metadata.csv", edit)
    with pytest.raises(DatasetError, match=r"rxrx1_v1\.0/metadata\.csv.*contiguous 0\.\.5.*missing: 4"):
        _ingest("rxrx1-wilds", root, tmp_path / "out")
