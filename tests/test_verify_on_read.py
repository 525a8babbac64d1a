"""Data verified on read: a part's sha256 is checked on the bytes a stream fetches, `inspect --verify` fails
with exit 2, and a split scheme whose selection split can read a test row is refused when the dataset opens."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from platebench.datasets import predicates
from platebench.datasets.errors import DatasetError
from platebench.datasets.manifest import Manifest
from platebench.datasets.shards import ShardDataset, open_dataset
from platebench.harness.cli import main
from shard_fixtures import build_tiny_dataset


def _change_one_pixel(root, plate: str):
    """Rewrite the plate's first part with one image byte changed, as a valid Parquet file with the same
    schema and rows, and leave the manifest's checksum as it was: damage only the checksum can see."""
    ds = open_dataset(root)
    part = ds.manifest.parts_of(plate)[0]
    path = Path(root) / part.path
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    pixel = bytearray(images[1])
    pixel[7] ^= 0x01
    images[1] = bytes(pixel)
    changed = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(changed, path, compression="zstd", row_group_size=changed.num_rows)
    # Still a readable part: schema, row count and image sizes all pass; one pixel differs.
    before, after = ds.images(table), ds.images(ds.read_part(part))
    assert int((before != after).sum()) == 1
    return part


def _edit_splits(root, **splits):
    path = Path(root) / "manifest.json"
    d = json.loads(path.read_text())
    d["split_schemes"]["new_batches"]["splits"].update(splits)
    path.write_text(json.dumps(d))
    return path


def test_channel_statistics_refuse_a_part_that_fails_its_checksum(tmp_path):
    from platebench.harness.data.channel_stats import channel_stats

    root = build_tiny_dataset(tmp_path / "ds")
    part = _change_one_pixel(root, open_dataset(root).manifest.plates_for("new_batches", "train")[0])
    with pytest.raises(DatasetError, match=f"{part.path}: checksum mismatch"):
        channel_stats(open_dataset(root), "new_batches", "train")


# ---- (a) the stream verifies what it reads -----------------------------------------------------------------
@pytest.mark.usefixtures("ray_session")
def test_stream_refuses_a_part_that_still_decodes_but_fails_its_checksum(tmp_path):
    from platebench.harness.data.stream import PartCache, PlateStream, StreamConfig
    from platebench.methods.base import BatchShape

    root = build_tiny_dataset(tmp_path / "ds")
    part = _change_one_pixel(root, "b2p1")
    ds = open_dataset(root)
    cfg = StreamConfig("new_batches", "val", BatchShape(4), train=False)
    with pytest.raises(DatasetError) as info:
        list(PlateStream(ds, cfg).epoch(0))
    msg = str(info.value)
    assert type(info.value) is DatasetError and "\n" not in msg  # the reader's own line, not Ray's traceback
    assert f"{part.path}: checksum mismatch (plate b2p1;" in msg
    assert part.sha256 in msg and "bytes read " in msg
    # The intact parts of the same dataset still stream, and go into the part cache as read.
    cache = PartCache(2**30)
    batches = list(PlateStream(ds, StreamConfig("new_batches", "test", BatchShape(4), train=False),
                               cache=cache).epoch(0))
    assert batches and set(cache._parts) == {p.path for p in ds.manifest.parts if p.plate.startswith("b3")}


@pytest.mark.usefixtures("ray_session")
def test_ray_data_keeps_the_type_of_a_read_tasks_dataset_error(tmp_path):
    """What the training lane relies on: Ray re-raises a read task's error as a subclass of DatasetError."""
    import ray.data
    from platebench.harness.data.source import PlateShardDatasource, plain_error
    from ray.exceptions import RayTaskError

    root = build_tiny_dataset(tmp_path / "ds")
    part = _change_one_pixel(root, "b1p0")
    ds = open_dataset(root)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with pytest.raises(DatasetError) as info:
        ray.data.read_datasource(PlateShardDatasource(ds, [part], 1, retries=0), override_num_blocks=1).materialize()
    assert isinstance(info.value, RayTaskError)
    plain = plain_error(info.value)
    assert type(plain) is DatasetError and "\n" not in str(plain)
    assert str(plain).startswith(f"{ds.part_url(part)}: checksum mismatch (plate b1p0;")


# ---- (b) a run on a damaged training part fails at once ----------------------------------------------------
@pytest.mark.usefixtures("ray_session")
# b1 site 1 is the training split, b3 the test split: a damaged test part is found before the first epoch too,
# not after training wrote validation records and its done marker
@pytest.mark.parametrize("plate", ["b1p0", "b3p0"], ids=["train-part", "test-part"])
def test_run_on_a_damaged_part_exits_2_without_done_marker_or_records(tmp_path, capsys, plate):
    root = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    part = _change_one_pixel(root, plate)
    out = tmp_path / "out"
    rc = main(["run", "--data", root, "--split-scheme", "new_batches", "--method", "erm", "--seeds", "0",
               "--epochs", "2", "--hparams", "batch_size=8", "--out", str(out), "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"DatasetError: {root}/{part.path}: checksum mismatch (plate {plate}; manifest sha256 {part.sha256}" in err
    assert "Traceback" not in err
    assert not list(out.glob("runs/*/done.json")) and not list(out.glob("trainings/*/done.json"))
    assert not list(out.glob("records/**/*.parquet"))


# ---- (c) inspect --verify -------------------------------------------------------------------------------------
def test_inspect_verify_exits_2_on_a_part_that_still_decodes(tmp_path, capsys):
    root = build_tiny_dataset(tmp_path / "ds")
    assert main(["inspect", "--data", root, "--verify"]) == 0
    capsys.readouterr()
    part = _change_one_pixel(root, "b2p1")
    assert main(["inspect", "--data", root, "--verify"]) == 2
    err = capsys.readouterr().err
    damaged = [ln for ln in err.splitlines() if ln.startswith("DAMAGED")]
    assert len(damaged) == 1 and part.path in damaged[0] and "plate b2p1" in damaged[0]
    assert err.rstrip().splitlines()[-1] == f"platebench inspect: error: {root}: verify found 1 of 6 parts damaged"


# ---- (d) the selection split never shares a row with a test split ---------------------------------------------
def test_selection_split_sharing_plates_with_a_test_split_is_refused_at_load(tmp_path):
    root = build_tiny_dataset(tmp_path / "ds")
    path = _edit_splits(root, test={"column": "batch", "in": ["b2", "b3"]})  # val is batch b2
    message = (r"split_schemes\.new_batches: selection split 'val' and test split 'test' both select every row of "
               r"plate 'b2p0'")
    with pytest.raises(DatasetError, match=message):
        Manifest.from_json(path.read_text())  # decided from the manifest alone
    with pytest.raises(DatasetError, match=message):
        open_dataset(root)


def test_selection_split_disjoint_by_site_is_accepted_without_reading_rows(tmp_path, monkeypatch):
    root = build_tiny_dataset(tmp_path / "ds")
    _edit_splits(root, val={"all": [{"column": "batch", "in": ["b1"]}, {"column": "site", "eq": 1}]})
    monkeypatch.setattr(ShardDataset, "metadata", lambda *a, **k: pytest.fail("rows were read"))
    ds = open_dataset(root)  # val = b1 site 1, id_test = b1 site 2, test = b3
    assert ds.manifest.selection_overlaps("new_batches") == {}


def test_selection_split_undecidable_from_the_manifest_is_decided_from_the_rows(tmp_path):
    root = build_tiny_dataset(tmp_path / "ds")
    # Well W00 (sites 1 and 2) of the test batch: only the rows say the two predicates meet.
    path = _edit_splits(root, val={"all": [{"column": "batch", "in": ["b3"]}, {"column": "well", "eq": "W00"}]},
                        test={"all": [{"column": "batch", "in": ["b3"]}, {"column": "site", "eq": 2}]})
    m = Manifest.from_json(path.read_text())
    assert m.selection_overlaps("new_batches") == {"test": ["b3p0", "b3p1"]}
    with pytest.raises(DatasetError, match=r"manifest\.json: split_schemes\.new_batches: selection split 'val' and "
                                           r"test split 'test' both select 2 row\(s\), e.g\. image_id 'b3p0_001'"):
        open_dataset(root)


def test_selection_split_disjoint_only_in_the_rows_is_accepted(tmp_path):
    root = build_tiny_dataset(tmp_path / "ds")
    # Controls (DMSO) are never labelled 0, but nothing in the predicates says so.
    _edit_splits(root, val={"all": [{"column": "batch", "in": ["b3"]}, {"column": "perturbation", "eq": "DMSO"}]},
                 test={"all": [{"column": "batch", "in": ["b3"]}, {"column": "label", "eq": 0}]})
    ds = open_dataset(root)
    assert ds.manifest.selection_overlaps("new_batches") == {"test": ["b3p0", "b3p1"]}


@pytest.mark.parametrize("a,b,known,expected", [
    ({"column": "batch", "in": ["b2"]}, {"column": "batch", "in": ["b3", "b4"]}, {}, False),
    ({"column": "site", "eq": 1}, {"column": "site", "eq": 2}, {}, False),
    ({"not": {"column": "site", "eq": 1}}, {"column": "site", "in": [1]}, {}, False),
    ({"any": [{"column": "site", "eq": 1}, {"column": "site", "eq": 3}]}, {"column": "site", "not_in": [1, 3]}, {},
     False),
    ({"column": "is_control", "ne": True}, {"column": "is_control", "ne": False}, {}, False),
    ({"column": "batch", "eq": "b1"}, {"column": "source", "eq": "s1"}, {"batch": "b1", "source": "s1"}, True),
    ({"column": "batch", "eq": "b1"}, {"column": "source", "eq": "s1"}, {"batch": "b1", "source": "s2"}, False),
    ({"column": "batch", "eq": "b1"}, {"column": "site", "eq": 2}, {"batch": "b1"}, None),
    (True, True, {}, True),
])
def test_predicate_overlap(a, b, known, expected):
    finite = {"is_control": frozenset((True, False))}
    assert predicates.overlap(a, b, known, finite) is expected

