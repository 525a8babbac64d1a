"""The re-batcher: plate purity, exact step counts (what DDP ranks rely on), control context."""

import numpy as np
import pyarrow as pa
import pytest
from platebench.harness.data.rebatch import Rebatcher, RebatchSpec, count_steps, plate_batch_count
from platebench.methods.base import BatchShape


def rebatch(triples, spec):
    """Feed (block, query mask, control mask) triples through a Rebatcher, as the stream does."""
    rb = Rebatcher(spec)
    for block, qmask, cmask in triples:
        rb.push(block, qmask, cmask)
        yield from rb.pop()
    rb.finish()
    yield from rb.pop()


def _block(plate: str, n: int, start: int = 0, controls: int = 0) -> pa.Table:
    ids = [f"{plate}_{i}" for i in range(start, start + n)]
    return pa.table({"image_id": ids, "plate": [plate] * n, "label": [i % 3 for i in range(n)],
                     "is_control": [i < controls for i in range(n)]})


def _feed(plates, spec, parts_per_plate=1, controls=0):
    triples = []
    for plate, n in plates:
        size = -(-n // parts_per_plate)
        for k in range(0, n, size):
            b = _block(plate, min(size, n - k), k, controls if k == 0 else 0)
            cm = np.asarray(b.column("is_control").to_pylist())
            triples.append((b, ~cm if controls else np.ones(b.num_rows, bool), cm))
    return list(rebatch(triples, spec))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_size", [4, 7, 32])
@pytest.mark.parametrize("parts", [1, 3])
def test_plate_pure_counts_match_prediction(train, batch_size, parts):
    plates = [("p0", 10), ("p1", 33), ("p2", 5), ("p3", 1)]
    spec = RebatchSpec(BatchShape(batch_size), train=train)
    items = _feed(plates, spec, parts)
    assert len(items) == count_steps(plates, spec)
    for it in items:
        assert len(set(it.queries.column("plate").to_pylist())) == 1
        assert it.queries.num_rows <= batch_size
    if not train:  # evaluation sees every row exactly once
        ids = [i for it in items for i in it.queries.column("image_id").to_pylist()]
        assert sorted(ids) == sorted(f"{p}_{i}" for p, n in plates for i in range(n))


def test_train_drops_small_remainders_but_eval_keeps_them():
    assert plate_batch_count(33, RebatchSpec(BatchShape(32), train=True)) == 1
    assert plate_batch_count(48, RebatchSpec(BatchShape(32), train=True)) == 2  # 16 >= 32 // 2
    assert plate_batch_count(33, RebatchSpec(BatchShape(32), train=False)) == 2
    assert plate_batch_count(33, RebatchSpec(BatchShape(0), train=False)) == 1


@pytest.mark.parametrize("g", [2, 3])
def test_multi_plate_steps_have_distinct_plates_and_predicted_count(g):
    plates = [("a", 20), ("b", 8), ("c", 40), ("d", 12), ("e", 4)]
    spec = RebatchSpec(BatchShape(4, plates_per_step=g), train=True)
    steps = _feed(plates, spec)
    assert len(steps) == count_steps(plates, spec) > 0
    for step in steps:
        assert len(step) == g
        assert len({it.plate for it in step}) == g


def test_mixed_batches_mix_plates_and_count_is_floor():
    plates = [(f"p{i}", 17) for i in range(8)]
    spec = RebatchSpec(BatchShape(8, plate_pure=False), train=True, mixed_buffer_plates=4)
    items = _feed(plates, spec)
    assert len(items) == count_steps(plates, spec) == (8 * 17) // 8
    assert max(len(set(it.queries.column("plate").to_pylist())) for it in items) > 1
    ids = [i for it in items for i in it.queries.column("image_id").to_pylist()]
    assert len(ids) == len(set(ids))  # no row twice


def test_same_seed_same_order_and_epoch_changes_it():
    plates = [("p0", 40), ("p1", 40)]

    def order(seed, epoch):
        spec = RebatchSpec(BatchShape(8), train=True, seed=seed, epoch=epoch)
        return [i for it in _feed(plates, spec) for i in it.queries.column("image_id").to_pylist()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_controls_come_from_the_same_plate_and_are_sampled_to_m():
    plates = [("p0", 30), ("p1", 30)]
    spec = RebatchSpec(BatchShape(5, n_controls=6), train=False)
    items = _feed(plates, spec, controls=4)
    assert items
    for it in items:
        assert it.controls.num_rows == 6
        assert set(it.controls.column("plate").to_pylist()) == {it.plate}
        assert all(it.controls.column("is_control").to_pylist())
        assert not any(it.queries.column("is_control").to_pylist())


def test_controls_missing_is_a_clear_error():
    spec = RebatchSpec(BatchShape(5, n_controls=2), train=False)
    with pytest.raises(ValueError, match="plate p0: the method needs negative controls"):
        _feed([("p0", 10)], spec, controls=0)


def test_block_with_two_plates_is_refused():
    b = pa.table({"image_id": ["a", "b"], "plate": ["p0", "p1"], "label": [0, 1], "is_control": [False, False]})
    with pytest.raises(ValueError, match="several plates"):
        list(rebatch([(b, np.ones(2, bool), np.zeros(2, bool))], RebatchSpec(BatchShape(2), train=False)))
