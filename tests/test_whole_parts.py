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
