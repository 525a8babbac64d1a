"""JUMP-CP ingestion from a `cellpainting-gallery` bucket on the local moto server (anonymous reads)."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from platebench.datasets import adapters
from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import open_dataset
from platebench.datasets.storage import StorageOptions
from platebench.harness.prepare.ingest import run_ingest
from raw_fixtures import BUCKET, C0, C1, C2, DMSO, JUMP_CHANNELS, _tiff, build_jump, jump_expected, write_load_data

SOURCES = ["source_3", "source_8"]
POSCON_ORDER = sorted(["JCP2022_037716", "JCP2022_064022", "JCP2022_025848", "JCP2022_050797", "JCP2022_046054",
                       "JCP2022_012818", "JCP2022_085227", "JCP2022_035095"])


def _bucket(s3_server, name: str, public: bool = False):
    """Create a bucket on the session's moto server (or reuse it if another test module made it)."""
    try:
        return s3_server.create_bucket(name, public=public)
    except Exception as exc:
        if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
            raise
        import boto3

        return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="module")
def jump(s3_server, tmp_path_factory):
    s3 = _bucket(s3_server, BUCKET, public=True)
    fx = build_jump(s3, tmp_path_factory.mktemp("jump-meta"))
    fx["s3"] = s3
    fx["options"] = StorageOptions(endpoint_url=s3_server.endpoint, anon=True, region="us-east-1")
    return fx


def _config(jump, src=None, **cfg):
    return {"src": src or jump["src"], "sources": SOURCES, "metadata": str(jump["meta_dir"]),
            "moa": str(jump["moa"]), "min_position_images": 0, "crop": 10, **cfg}


def _ingest(jump, out, src=None, skip_bad=False, **cfg):
    return run_ingest("jump-cp", _config(jump, src, **cfg), str(out), src_options=jump["options"], executor="local",
                      progress=False, skip_bad=skip_bad)


def _plan(jump, **cfg):
    """Planning only (reads metadata and load_data, no images): cheap checks of labels and filters."""
    return adapters.get("jump-cp").plan(_config(jump, **cfg), src_options=jump["options"])


@pytest.fixture(scope="module")
def default_out(jump, tmp_path_factory):
    out = tmp_path_factory.mktemp("jump-out") / "ds"
    result = _ingest(jump, out)
    return out, result


def _by_image_id(jump) -> dict[str, dict]:
    """Expected image_id -> load_data row (sites normalised to 1-based)."""
    out = {}
    for plate, rows in jump["sites"].items():
        base = min(r["Metadata_Site"] for r in rows)
        for r in rows:
            out[f"{r['Metadata_Source']}_{r['Metadata_Batch']}_{plate}_{r['Metadata_Well']}_"
                f"{r['Metadata_Site'] - base + 1}"] = r
    return out


def test_jump_rows_labels_controls_and_pixels(jump, default_out):
    out, result = default_out
    ds = open_dataset(str(out))
    m = ds.manifest
    assert m.classes == POSCON_ORDER and m.image_shape == (5, 10, 10) and m.channels == JUMP_CHANNELS
    # 6 COMPOUND plates (P304 is in an excluded batch, P305 is TARGET2) x wells A01-A03 x 2 sites;
    # A04 (a non-class compound), A05 (empty well) and A06 (no well metadata) are not ingested.
    assert sorted(m.plates) == ["P301", "P302", "P303", "Q801", "Q802", "Q803"]
    assert result["images"] == m.rows == 36
    expected = _by_image_id(jump)
    meta = ds.metadata().to_pylist()
    assert len(meta) == 36
    for row in meta:
        src = expected[row["image_id"]]
        comp = {"A01": DMSO, "A02": C0, "A03": C2 if row["plate"].startswith("Q") else C1}[row["well"]]
        assert row["perturbation"] == comp and row["is_control"] == (comp == DMSO)
        assert row["label"] == (-1 if comp == DMSO else POSCON_ORDER.index(comp))
        assert row["source"] == src["Metadata_Source"] and row["batch"] == src["Metadata_Batch"]
        assert row["site"] in (1, 2) and row["cell_type"] == "U2OS"
    for part in m.parts:
        table = ds.read_part(part, verify=True)
        for image_id, img in zip(table["image_id"].to_pylist(), ds.images(table)):
            src = expected[image_id]
            for k, ch in enumerate(JUMP_CHANNELS):
                url = src.get(f"URL_Orig{ch}")
                np.testing.assert_array_equal(img[k], jump_expected(jump["raw"][url], crop=10), err_msg=url)
    prov = m.provenance
    assert prov["site_base"] == {"source_3": 0, "source_8": 1}
    assert prov["class_annotations"][C2]["moa"] == ["potassium channel blocker", "sodium channel blocker"]
    assert prov["dropped"]["empty well"] == 6 and prov["dropped"]["no well metadata"] == 6


def test_jump_sources_of_different_sizes_need_a_common_size(jump, tmp_path):
    with pytest.raises(DatasetError, match=r"source_3 12x12, source_8 10x10.*--size N"):
        _ingest(jump, tmp_path / "out", crop=None)


def test_jump_split_schemes_are_plate_grouped_and_deterministic(jump, default_out):
    m = open_dataset(str(default_out[0])).manifest
    s3_plates, s8_plates = {"P301", "P302", "P303"}, {"Q801", "Q802", "Q803"}
    assert set(m.split_schemes) == {*(f"plate-folds-source_3-{k}" for k in range(3)),
                                    *(f"plate-folds-source_8-{k}" for k in range(3)),
                                    "source-to-source-source_3-to-source_8", "source-to-source-source_8-to-source_3"}
    for src, plates in (("source_3", s3_plates), ("source_8", s8_plates)):
        tests = []
        for k in range(3):
            sch = m.scheme(f"plate-folds-{src}-{k}")
            sp = {name: set(p["in"]) for name, p in sch.splits.items()}
            assert sch.selection_split == "val"
            assert sp["train"] | sp["val"] | sp["test"] == plates
            assert not (sp["train"] & sp["val"] or sp["train"] & sp["test"] or sp["val"] & sp["test"])
            tests.append(sp["test"])
        assert sorted(p for t in tests for p in t) == sorted(plates)  # the test folds partition the plates
    s2s = m.scheme("source-to-source-source_3-to-source_8").splits
    assert set(s2s["test"]["in"]) == s8_plates
    assert set(s2s["train"]["in"]) | set(s2s["val"]["in"]) == s3_plates and s2s["val"]["in"]
    ds = open_dataset(str(default_out[0]))
    assert {r["plate"] for r in ds.split_metadata("plate-folds-source_3-0", "test").to_pylist()} == \
        set(m.scheme("plate-folds-source_3-0").splits["test"]["in"])
    # the same inputs give the same splits
    again = _plan(jump)
    assert {k: v.splits for k, v in again.split_schemes.items()} == {k: v.splits for k, v in m.split_schemes.items()}


def test_jump_illumination_correction(jump, tmp_path):
    _ingest(jump, tmp_path / "out", sources=["source_3"], illum=True, crop=None)
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.manifest.image_shape == (5, 12, 12)
    expected = _by_image_id(jump)
    table = ds.read_part(ds.manifest.parts[0])
    for image_id, img in zip(table["image_id"].to_pylist(), ds.images(table)):
        src = expected[image_id]
        for k, ch in enumerate(JUMP_CHANNELS):
            illum = jump["illum"][f"{src[f'PathName_Illum{ch}']}/{src[f'FileName_Illum{ch}']}"]
            np.testing.assert_array_equal(img[k], jump_expected(jump["raw"][src[f"URL_Orig{ch}"]], illum=illum))


def _wells(plan) -> list[tuple[str, str, str, int, bool]]:
    return [(p["plate"], w, *v) for p in plan.plates for w, v in sorted(p["wells"].items())]


def test_jump_label_by_moa_drops_multi_label_compounds(jump):
    plan = _plan(jump, label_by="moa")
    assert plan.classes == ["DYRK inhibitor", "glucocorticoid receptor agonist"]
    wells = _wells(plan)
    assert C2 not in {w[2] for w in wells}  # quinidine has two MoAs
    assert {w[3] for w in wells if w[2] == C0} == {0} and {w[3] for w in wells if w[2] == C1} == {1}
    assert plan.provenance["dropped"]["multi-label MoA (label_by=moa)"] == 1


@pytest.mark.parametrize("threshold, labelled_wells", [(5, 12), (6, 0)])
def test_jump_position_filter_drops_small_positions(jump, threshold, labelled_wells):
    # every labelled (compound, well) position has 3 plates x 2 sites = 6 images per source
    wells = _wells(_plan(jump, min_position_images=threshold))
    assert sum(w[3] >= 0 for w in wells) == labelled_wells and sum(w[4] for w in wells) == 6


# ---------------------------------------------------------------------------------------------
# bad input: new load_data under a fresh prefix, pointing at the module's images (never templated)
# ---------------------------------------------------------------------------------------------
def _put_tiff(jump, key: str, arr: np.ndarray) -> str:
    jump["s3"].put_object(Bucket=BUCKET, Key=key, Body=_tiff(arr), ACL="public-read")
    return f"s3://{BUCKET}/{key}"


def _variant(jump, prefix: str, edit) -> str:
    sites = copy.deepcopy(jump["sites"])
    edit(sites)
    write_load_data(jump["s3"], prefix, sites)
    return f"s3://{BUCKET}/{prefix}"


def _point(row: dict, ch: str, url: str) -> None:
    folder, name = url.rsplit("/", 1)
    row[f"URL_Orig{ch}"], row[f"PathName_Orig{ch}"], row[f"FileName_Orig{ch}"] = url, folder, name


def test_jump_missing_channel_file(jump, tmp_path):
    missing = f"s3://{BUCKET}/nowhere/P999_A02_missing.tif"
    src = _variant(jump, "t-missing", lambda s: _point(s["Q801"][2], "ER", missing))  # Q801 A02 site 1
    with pytest.raises(DatasetError) as err:
        _ingest(jump, tmp_path / "out", src=src, sources=["source_8"], crop=None)
    assert missing in str(err.value) and "file is missing" in str(err.value) and "channel ER" in str(err.value)
    result = _ingest(jump, tmp_path / "out2", src=src, skip_bad=True, sources=["source_8"], crop=None)
    assert result["images"] == 17 and result["skipped"] == 1
    report = json.loads((tmp_path / "out2" / "skipped.json").read_text())
    assert report["items"][0]["file"] == missing and report["items"][0]["plate"] == "Q801"


@pytest.mark.parametrize("arr, words", [
    (np.zeros((20, 20), np.uint8), ["uint8", "expected 20x20 uint16"]),
    (np.zeros((30, 30), np.uint16), ["30x30 uint16", "expected 20x20"]),
])
def test_jump_image_of_wrong_dtype_or_size(jump, tmp_path, arr, words):
    url = _put_tiff(jump, f"t-bad/{arr.dtype}-{arr.shape[0]}.tif", arr)
    src = _variant(jump, f"t-bad-{arr.dtype}-{arr.shape[0]}", lambda s: _point(s["Q802"][1], "DNA", url))
    with pytest.raises(DatasetError) as err:
        _ingest(jump, tmp_path / "out", src=src, sources=["source_8"], crop=None)
    assert url in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_jump_unknown_plate_in_load_data(jump, tmp_path):
    def edit(sites):
        stray = dict(sites["P302"][0], Metadata_Plate="ZZZ999")
        sites["P302"].append(stray)

    src = _variant(jump, "t-unknown", edit)
    with pytest.raises(DatasetError, match=r"t-unknown/source_3/.*/P302/load_data_with_illum\.parquet.*ZZZ999.*"
                                           r"not in plate\.csv\.gz"):
        _plan(jump, src=src, sources=["source_3"])
    plan = adapters.get("jump-cp").plan(_config(jump, src, sources=["source_3"]), src_options=jump["options"],
                                        skip_bad=True)
    assert [i["item"].split()[2] for i in plan.skipped] == ["Metadata_Plate=ZZZ999"]
    assert sum(p["n"] for p in plan.plates) == 18


def test_jump_private_bucket_refuses_anonymous_reads(jump, s3_server, tmp_path):
    _bucket(s3_server, "private-gallery")
    jump["s3"].put_object(Bucket="private-gallery", Key="x/source_3/workspace/load_data_csv/B1/P301/load_data.csv",
                          Body=b"Metadata_Plate,Metadata_Well,Metadata_Site\n")
    with pytest.raises(Exception, match="access denied|Forbidden|AccessDenied"):
        _ingest(jump, tmp_path / "out", src="s3://private-gallery/x", sources=["source_3"])


def test_tiff_fixture_is_uint16(jump):
    import tifffile

    url = next(iter(jump["raw"]))
    key = url.split(f"{BUCKET}/", 1)[1]
    data = jump["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert tifffile.imread(io.BytesIO(data)).dtype == np.uint16


def test_jump_ray_job_writes_to_s3_and_resumes(jump, ray_session, s3_server):
    """Ray tasks get the source (anonymous) and output (signed) storage options explicitly."""
    _bucket(s3_server, "pb-ingest-out")
    out = "s3://pb-ingest-out/jump"
    kw = dict(src_options=jump["options"], out_options=s3_server.options(), progress=False)
    first = run_ingest("jump-cp", _config(jump, sources=["source_8"], crop=None), out, **kw)
    assert (first["plates_written"], first["images"]) == (3, 18)
    again = run_ingest("jump-cp", _config(jump, sources=["source_8"], crop=None), out, **kw)
    assert (again["plates_written"], again["plates_resumed"]) == (0, 3)
    ds = open_dataset(out, s3_server.options())
    assert ds.verify() == [] and ds.manifest.image_shape == (5, 10, 10)
    assert ds.manifest.provenance["site_base"] == {"source_8": 1}


def test_jump_cli_reads_the_gallery_anonymously(jump, s3_env, tmp_path, capsys):
    from platebench.harness.cli import main

    rc = main(["ingest", "jump-cp", "--src", jump["src"], "--sources", "source_8", "--metadata",
               str(jump["meta_dir"]), "--moa", str(jump["moa"]), "--min-position-images", "0",
               "--data", str(tmp_path / "out"), "--executor", "local", "--no-progress", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 18 and result["dataset"] == "jump-cp-moa"
