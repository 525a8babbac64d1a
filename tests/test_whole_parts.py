"""Whole parts from Ray Data's blocks (harness/data/source.py::whole_parts): Ray Data may join a task's tables into
one block or cut a large one, so the stream rebuilds each part from its rows' index column, in plan order, with
the manifest's row count, and names the part when the blocks do not add up."""

import pyarrow as pa
import pytest
from platebench.harness.data.source import PART_INDEX, whole_parts
from platebench.harness.errors import HarnessError

pytestmark = pytest.mark.unit

ROWS = [3, 5, 2]


def _part(i: int) -> pa.Table:
    return pa.table({"x": [f"p{i}r{r}" for r in range(ROWS[i])], PART_INDEX: pa.array([i] * ROWS[i], pa.int32())})


def _reshaped(cuts: list[int]) -> list[pa.Table]:
    """The three parts' rows, in order, cut into blocks at the given row offsets (as Ray Data's shaping might)."""
    rows = pa.concat_tables([_part(i) for i in range(len(ROWS))]).combine_chunks()
    bounds = [0, *cuts, rows.num_rows]
    return [rows.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


def _where(i: int) -> str:
    return f"part-{i}"


@pytest.mark.parametrize("cuts", [[3, 8], [], [1, 2, 3, 4, 9], [4], [2, 6, 6, 9]],
                         ids=["one-per-part", "all-in-one", "pieces", "straddling", "with-an-empty-block"])
def test_parts_come_back_whole_and_in_order_however_the_blocks_are_cut(cuts):
    parts = list(whole_parts(_reshaped(cuts), ROWS, _where))
    assert [p.to_pydict() for p in parts] == [_part(i).drop_columns([PART_INDEX]).to_pydict() for i in range(3)]


def test_a_part_out_of_plan_order_is_named():
    blocks = [_part(0), _part(2), _part(1)]
    with pytest.raises(HarnessError, match="part-1: Ray Data delivered part 2 of the read in its place"):
        list(whole_parts(blocks, ROWS, _where))


def test_more_rows_than_the_manifest_lists_are_named():
    with pytest.raises(HarnessError, match="part-0: stream delivered 3 rows, manifest says 2"):
        list(whole_parts([_part(0)], [2, 5, 2], _where))


def test_a_read_that_ends_early_names_the_missing_part():
    with pytest.raises(HarnessError, match="part-1: stream delivered 4 rows, manifest says 5"):
        list(whole_parts(_reshaped([3, 7])[:2], ROWS, _where))


def test_a_block_beyond_the_last_part_is_refused():
    with pytest.raises(HarnessError, match="part-2: Ray Data delivered part 0"):
        list(whole_parts([*_reshaped([]), _part(0)], ROWS, _where))


@pytest.mark.parametrize("sizes,slots,budget,runs", [
    ([10] * 8, 2, 1000, [(0, 4), (4, 8)]),           # half the read per task: both read slots busy
    ([10] * 8, 1, 25, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # the byte budget caps a task
    ([10, 50, 10, 10], 1, 30, [(0, 1), (1, 2), (2, 4)]),  # a part over the budget is a run of its own
    ([10] * 3, 8, 1000, [(0, 1), (1, 2), (2, 3)]),   # more slots than parts: one part per task
    ([], 2, 1000, []),
])
def test_read_runs_are_consecutive_within_budget_and_fill_the_slots(sizes, slots, budget, runs):
    from platebench.harness.data.source import read_runs

    assert [(r.start, r.stop) for r in read_runs(sizes, slots, budget)] == runs


@pytest.mark.parametrize("sizes", [[100, 100, 37], [5, 1000, 800, 999]])
def test_block_target_emits_every_large_part_alone_and_uncut(sizes):
    # Ray Data emits a block once its buffer exceeds the target and cuts one at 1.5 times the target; a part's
    # table is its images plus its metadata columns (0.2% more on `large`; 10% allowed here).
    from platebench.harness.data.source import block_target

    target = block_target(sizes)
    big = [s for s in sizes if s > 0.8 * max(sizes)]
    assert len(big) >= 2 and all(target < s and 1.1 * s < 1.5 * target for s in big)
