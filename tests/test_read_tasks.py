"""How the stream's parts are cut into Ray Data read tasks (harness/data/source.py::read_groups): every part once,
in plan order, in runs of near-equal size, with enough runs for every read slot."""

import pytest
from platebench.harness.data.source import read_groups

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sizes,task_bytes,min_tasks", [
    ([10] * 16, 40, 1), ([10] * 16, 1000, 4), ([10] * 3, 1000, 8), ([100, 1, 1, 1, 100, 7], 50, 2),
    ([5], 1, 3), ([1] * 7, 2, 7), ([30, 30, 30, 3] * 5, 64, 2)])
def test_read_groups_cover_every_part_once_in_order_with_enough_runs(sizes, task_bytes, min_tasks):
    runs = read_groups(sizes, task_bytes, min_tasks)
    assert [i for r in runs for i in r] == list(range(len(sizes)))  # each part once, in plan order
    assert all(len(r) for r in runs)
    assert len(runs) == min(len(sizes), max(min_tasks, -(-sum(sizes) // task_bytes)))
    # Near-equal runs: none holds more than its share plus one part.
    share = sum(sizes) / len(runs)
    assert all(sum(sizes[i] for i in r) <= share + max(sizes) for r in runs), runs


def test_read_groups_of_nothing_is_no_task():
    assert read_groups([], 10, 4) == []
