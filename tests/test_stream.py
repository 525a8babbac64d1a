"""Plate-grouped streaming with Ray Data: purity, coverage, rank disjointness, seeds, controls, S3."""

import pytest
import torch
from platebench.datasets.shards import open_dataset
from platebench.harness.data.stream import PlateStream, StreamConfig
from platebench.methods.base import BatchShape

pytestmark = pytest.mark.usefixtures("ray_session")


def _ids(batches):
    return [i for b in batches for i in b.image_ids]


def test_eval_epoch_is_plate_pure_and_covers_split_once(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    cfg = StreamConfig(scheme="new_batches", split="test", shape=BatchShape(5), train=False, keep_ids=True)
    batches = list(PlateStream(ds, cfg).epoch(0))
    for b in batches:
        assert b.plate is not None and set(i.rsplit("_", 1)[0] for i in b.image_ids) == {b.plate}
        assert int(b.domains["plate"].unique().numel()) == 1
    expected = ds.split_metadata("new_batches", "test")
    expected = sorted(r["image_id"] for r in expected.to_pylist() if r["label"] >= 0)
    assert sorted(_ids(batches)) == expected
    assert len(_ids(batches)) == len(set(_ids(batches)))


def test_images_are_self_standardised_floats(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    b = next(PlateStream(ds, StreamConfig("new_batches", "val", BatchShape(4), train=False)).epoch(0))
    assert b.images.dtype == torch.float32 and tuple(b.images.shape[1:]) == ds.manifest.image_shape
    assert torch.allclose(b.images.mean(dim=(2, 3)), torch.zeros(1), atol=1e-5)
    assert torch.allclose(b.images.std(dim=(2, 3), unbiased=False), torch.ones(1), atol=1e-4)


def test_two_ranks_get_disjoint_plates_and_equal_steps(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    cfg = StreamConfig(scheme="new_batches", split="val", shape=BatchShape(4), train=True, seed=3, keep_ids=True)
    streams = [PlateStream(ds, cfg, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        plates = [{b.plate for b in s.epoch(epoch)} for s in streams]
        assert plates[0] and plates[1] and not plates[0] & plates[1]
        assert len(list(streams[0].epoch(epoch))) == len(list(streams[1].epoch(epoch))) == streams[0].steps(epoch)


def test_same_seed_same_order_other_seed_other_order(tiny_dataset):
    ds = open_dataset(tiny_dataset)

    def order(seed, epoch=0):
        cfg = StreamConfig("new_batches", "val", BatchShape(4), train=True, seed=seed, augment="flip-rot90",
                           keep_ids=True)
        batches = list(PlateStream(ds, cfg).epoch(epoch))
        return _ids(batches), torch.cat([b.images for b in batches])

    a_ids, a_x = order(1)
    b_ids, b_x = order(1)
    assert a_ids == b_ids and torch.equal(a_x, b_x)
    assert order(2)[0] != a_ids
    assert order(1, epoch=1)[0] != a_ids


def test_controls_are_appended_from_the_same_plate(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    cfg = StreamConfig("new_batches", "test", BatchShape(4, n_controls=3), train=False, keep_ids=True)
    meta = {r["image_id"]: r for r in ds.metadata().to_pylist()}
    for b in PlateStream(ds, cfg).epoch(0):
        assert int(b.is_control.sum()) == 3 and len(b.image_ids) == int((~b.is_control).sum())
        assert (b.labels[b.is_control] == -1).all()
        plate_ids = b.domains["plate"][b.is_control].unique().tolist()
        assert plate_ids == b.domains["plate"][~b.is_control].unique().tolist()
        assert all(not meta[i]["is_control"] for i in b.image_ids)


def test_multi_plate_steps(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    cfg = StreamConfig("new_batches", "val", BatchShape(4, plates_per_step=2), train=True)
    steps = list(PlateStream(ds, cfg).epoch(0))
    assert steps and all(len(s) == 2 and s[0].plate != s[1].plate for s in steps)


def test_s3_stream_gives_the_same_bytes_as_local_disk(tiny_dataset, s3_server, tmp_path):
    from shard_fixtures import build_tiny_dataset

    s3_server.create_bucket("pb-stream")
    opts = s3_server.options()
    url = build_tiny_dataset("s3://pb-stream/tiny", options=opts)
    cfg = StreamConfig("new_batches", "test", BatchShape(5), train=False, keep_ids=True)
    local = list(PlateStream(open_dataset(tiny_dataset), cfg).epoch(0))
    remote = list(PlateStream(open_dataset(url, opts), cfg).epoch(0))
    assert _ids(local) == _ids(remote)
    assert torch.equal(torch.cat([b.images for b in local]), torch.cat([b.images for b in remote]))


def test_controls_needed_but_absent_is_a_clear_error(tmp_path):
    from platebench.harness.errors import HarnessError
    from shard_fixtures import build_tiny_dataset

    url = build_tiny_dataset(tmp_path / "noctrl", controls_per_plate=0)
    with pytest.raises(HarnessError, match="needs negative controls"):
        PlateStream(open_dataset(url), StreamConfig("new_batches", "test", BatchShape(4, n_controls=2), train=False))


def test_unknown_split_is_named(tiny_dataset):
    from platebench.datasets.errors import DatasetError

    with pytest.raises(DatasetError, match="split 'nope' is not in scheme 'new_batches'"):
        PlateStream(open_dataset(tiny_dataset), StreamConfig("new_batches", "nope", BatchShape(4), train=False))


def test_reads_deliver_whole_parts_in_plan_order_without_their_index_column(tmp_path):
    from shard_fixtures import build_tiny_dataset

    ds = open_dataset(build_tiny_dataset(tmp_path / "ds", images_per_plate=16, part_rows=2))
    stream = PlateStream(ds, StreamConfig("new_batches", "val", BatchShape(4), train=True, seed=5))
    parts = stream.parts([p for p, _ in stream.plan(0)[0]], 0)
    blocks = list(stream.read_parts(parts))
    assert len(parts) > 4 and len(blocks) == len(parts)
    for part, block in zip(parts, blocks):
        assert block.equals(ds.read_part(part))  # the index column is dropped, the part is whole


def test_a_read_task_of_several_parts_delivers_each_part_as_its_own_block(tmp_path):
    # One read task per part left Ray Data's readers idle half the time (its per-task cost is as large as a part's
    # read): tasks read runs of parts, and each part must still leave its task as a block of its own, as it is read.
    from platebench.harness.data.source import PART_INDEX, PlateShardDatasource, read_runs
    from shard_fixtures import build_tiny_dataset

    # 16 px: metadata columns are 6% of a part's table (at 8 px, 22%: Ray Data would cut some parts in two)
    ds = open_dataset(build_tiny_dataset(tmp_path / "ds", images_per_plate=16, part_rows=4, size=16))
    stream = PlateStream(ds, StreamConfig("new_batches", "val", BatchShape(4), train=False, read_concurrency=2))
    parts = stream.parts([p for p, _ in stream.plan(0)[0]], 0)
    source = PlateShardDatasource(ds, parts, 2)
    tasks = source.get_read_tasks(len(parts))
    assert len(tasks) == len(read_runs(source.part_bytes(), 2)) == 2 and len(parts) >= 8
    blocks = list(stream.read_dataset(parts).iter_batches(batch_size=None, batch_format="pyarrow"))
    assert [sorted(set(b.column(PART_INDEX).to_pylist())) for b in blocks] == [[i] for i in range(len(parts))]
