"""The plate-shard format: what the reader refuses (naming file and field) and how the writer commits."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from platebench.datasets.errors import DatasetError
from platebench.datasets.manifest import Manifest
from platebench.datasets.shards import make_table, open_dataset, write_manifest, write_plate
from shard_fixtures import build_tiny_dataset


@pytest.fixture
def ds_dir(tmp_path):
    return build_tiny_dataset(tmp_path / "ds")


def _edit_manifest(root, fn):
    path = Path(root) / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_round_trip_keeps_images_and_puts_controls_first(ds_dir):
    ds = open_dataset(ds_dir)
    part = ds.manifest.parts[0]
    t = ds.read_part(part, verify=True)
    flags = t.column("is_control").to_pylist()
    assert flags == sorted(flags, reverse=True) and any(flags)
    imgs = ds.images(t)
    assert imgs.shape == (part.rows, 5, 8, 8) and imgs.dtype == np.uint8


def test_unknown_format_version_is_refused(ds_dir):
    _edit_manifest(ds_dir, lambda d: d.update(format_version=99))
    with pytest.raises(DatasetError, match=r"manifest.json: unknown format_version 99"):
        open_dataset(ds_dir)


def test_unknown_manifest_field_is_refused(ds_dir):
    _edit_manifest(ds_dir, lambda d: d.update(colour="blue"))
    with pytest.raises(DatasetError, match=r"unknown field\(s\) \['colour'\]"):
        open_dataset(ds_dir)


def test_split_predicate_over_missing_column_names_scheme_split_and_column(ds_dir):
    _edit_manifest(ds_dir, lambda d: d["split_schemes"]["new_batches"]["splits"].update(
        test={"column": "plate_row", "eq": "A"}))
    with pytest.raises(DatasetError, match=r"split_schemes\.new_batches\.splits\.test: predicate names column "
                                           r"'plate_row', which does not exist"):
        open_dataset(ds_dir)


def test_row_count_mismatch_names_the_part(ds_dir):
    _edit_manifest(ds_dir, lambda d: d["parts"][0].update(rows=d["parts"][0]["rows"] + 1))
    ds = open_dataset(ds_dir)
    with pytest.raises(DatasetError, match=r"plates/b1p0/part-00000\.parquet: row count mismatch"):
        ds.read_part(ds.manifest.parts[0])


def test_checksum_mismatch_names_the_part(ds_dir):
    ds = open_dataset(ds_dir)
    part = ds.manifest.parts[2]
    path = Path(ds_dir) / part.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = ds.verify()
    assert len(problems) == 1 and part.path in problems[0]


def _rewrite_part(ds_dir, part, table):
    path = Path(ds_dir) / part.path
    pq.write_table(table, path)


def test_schema_mismatch_names_the_column(ds_dir):
    ds = open_dataset(ds_dir)
    part = ds.manifest.parts[0]
    t = ds.read_part(part)
    _rewrite_part(ds_dir, part, t.set_column(t.schema.get_field_index("site"), "site",
                                             pa.array([str(s) for s in t.column("site").to_pylist()])))
    with pytest.raises(DatasetError, match=r"part-00000\.parquet: schema mismatch, column 'site' has type string"):
        ds.read_part(part)
    _rewrite_part(ds_dir, part, t.drop_columns(["well"]))
    with pytest.raises(DatasetError, match=r"column 'well' is missing"):
        ds.read_part(part)


def test_wrong_image_byte_length_names_the_field(ds_dir):
    ds = open_dataset(ds_dir)
    part = ds.manifest.parts[0]
    t = ds.read_part(part)
    images = t.column("image").to_pylist()
    images[3] = images[3][:-1]
    _rewrite_part(ds_dir, part, t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary())))
    with pytest.raises(DatasetError, match=r"field 'image' at row 3 has 319 bytes, expected 320"):
        ds.read_part(part)


def test_missing_part_is_named(ds_dir):
    ds = open_dataset(ds_dir)
    os.remove(Path(ds_dir) / ds.manifest.parts[1].path)
    with pytest.raises(DatasetError, match=r"part-00000\.parquet: part listed in the manifest is missing"):
        ds.read_part(ds.manifest.parts[1])


def _one_plate(plate="P1", n=4):
    meta = {"image_id": [f"{plate}_{i}" for i in range(n)], "source": ["s"] * n, "batch": ["b"] * n,
            "plate": [plate] * n, "well": ["A01"] * n, "site": [1] * n, "cell_type": ["c"] * n,
            "perturbation": ["x"] * n, "label": [0] * n, "is_control": [False] * n}
    return make_table(meta, np.zeros((n, 5, 8, 8), np.uint8))


def test_nothing_is_visible_before_the_manifest_and_no_temp_files_remain(tmp_path):
    root = str(tmp_path / "ds")
    parts = write_plate(root, "P1", _one_plate(), image_nbytes=320)
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        open_dataset(root)  # parts alone are not a dataset: a crash before the manifest leaves nothing readable
    m = Manifest(name="x", version="1", channels=list("abcde"), height=8, width=8, dtype="uint8", classes=["k"],
                 negative_control={"description": "", "column": "perturbation", "values": []},
                 split_schemes={}, plates={"P1": {"source": "s", "batch": "b", "cell_type": "c"}}, parts=parts)
    write_manifest(root, m)
    assert open_dataset(root).manifest.rows == 4
    leftovers = [p for p in Path(root).rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_manifest_pointing_at_a_missing_part_is_never_written(tmp_path):
    root = str(tmp_path / "ds")
    parts = write_plate(root, "P1", _one_plate(), image_nbytes=320)
    os.remove(Path(root) / parts[0].path)
    m = Manifest(name="x", version="1", channels=list("abcde"), height=8, width=8, dtype="uint8", classes=["k"],
                 negative_control={"description": "", "column": "perturbation", "values": []},
                 split_schemes={}, plates={"P1": {"source": "s", "batch": "b", "cell_type": "c"}}, parts=parts)
    with pytest.raises(DatasetError, match="refusing to write; 1 listed part"):
        write_manifest(root, m)
    assert not (Path(root) / "manifest.json").exists()


def test_a_part_holds_one_plate(tmp_path):
    t = pa.concat_tables([_one_plate("P1"), _one_plate("P2")])
    with pytest.raises(DatasetError, match="a part holds one plate only"):
        write_plate(str(tmp_path), "P1", t, image_nbytes=320)


def test_relative_dataset_paths_become_absolute(tmp_path, monkeypatch):
    # Ray workers and Tune trials run in other working directories: a relative path must not reach them.
    build_tiny_dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    ds = open_dataset("ds")
    assert ds.url == str(tmp_path / "ds")
    import pickle

    assert pickle.loads(pickle.dumps(ds)).url == str(tmp_path / "ds")
