"""A leaderboard ranks complete runs only: a run without its done marker, without the records of an epoch (the best
one's file deleted), or with a truncated records file is left out and named (stderr, leaderboard.json, the Markdown),
and the tables are computed from the other runs; an edited done marker is an error naming it."""

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from leaderboard_fixtures import run_id, value, write_root
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.results import sources
from platebench.harness.results.leaderboard import build_leaderboard
from platebench.harness.results.report import plot_names, to_html, to_markdown

pytestmark = pytest.mark.faults

METHODS = ("erm", "m2", "m3")


@pytest.fixture
def root(tmp_path):
    return Path(write_root(tmp_path / "store", datasets=("alpha",), methods=METHODS, sweeps=False))


def _board(root: Path) -> dict:
    merged = sources.load([str(root)])
    return build_leaderboard(merged.records, sources=merged.sources, done=merged.done, skipped=merged.skipped)


def _row(board: dict, method: str) -> dict:
    (t,) = [t for t in board["tables"] if t["split"] == "test" and t["track"] == "standard"]
    return next(r for r in t["rows"] if r["method"] == method)


def _expected_mean(method: str, seeds) -> float:
    # the fixture's test Total at the selected epoch 2 (test rows carry no offset on top of value())
    return sum(value("alpha", "test", method, s, 2) for s in seeds) / len(seeds)


def test_a_run_without_its_done_marker_is_left_out_and_named(root):
    rid = run_id("erm", "alpha", 1)
    (root / "runs" / rid / "done.json").unlink()
    board = _board(root)
    assert board["skipped_runs"] == [{"run_id": rid, "method": "erm", "seed": 1, "source": str(root),
                                      "reason": f"no done marker (runs/{rid}/done.json): the run did not finish"}]
    erm = _row(board, "erm")
    assert sorted(erm["per_seed"]) == ["0", "2"] and erm["n"] == 2
    assert erm["mean"] == pytest.approx(_expected_mean("erm", (0, 2)))
    line = f"run {rid} (erm seed 1) in {root} left out: no done marker (runs/{rid}/done.json)"
    assert f"- {line}" in to_markdown(board)
    page = to_html(board, {name: b"" for name in plot_names(board)})
    assert "<section id='skipped-runs'>" in page and f"<li>{line}" in page


def test_a_deleted_best_epoch_file_leaves_the_run_out_instead_of_selecting_another_epoch(root):
    # Epoch 2 is every run's best validation epoch; without its file, selection would read epoch 1's test numbers
    # (5 points lower) as erm seed 0's result.
    rid = run_id("erm", "alpha", 0)
    (root / "records" / rid / "epoch-00002.parquet").unlink()
    board = _board(root)
    (skipped,) = board["skipped_runs"]
    assert skipped["run_id"] == rid
    assert skipped["reason"] == (f"no validation records at epoch(s) [2] of its 2 ({root}/records/{rid}/"
                                 "epoch-00002.parquet is missing or lacks them)")
    erm = _row(board, "erm")
    assert sorted(erm["per_seed"]) == ["1", "2"]
    assert erm["mean"] == pytest.approx(_expected_mean("erm", (1, 2)))
    assert all(e == 2 for e in erm["epochs"].values())


def test_missing_test_records_at_the_selected_epoch_leave_the_run_out(root):
    rid = run_id("m3", "alpha", 2)
    path = root / "records" / rid / "epoch-00002.parquet"
    t = pq.read_table(path)
    pq.write_table(t.filter(pc.not_equal(t.column("split_role"), "test")), path)  # validation kept, tests gone
    (skipped,) = _board(root)["skipped_runs"]
    assert skipped["run_id"] == rid and skipped["reason"].startswith("no test records at selectable epoch(s) [2] (")


def test_a_truncated_records_file_is_named_and_its_run_left_out(root, capsys, monkeypatch):
    rid = run_id("m2", "alpha", 2)
    path = root / "records" / rid / "epoch-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    from platebench.harness.results import report

    monkeypatch.setattr(report, "make_plots", lambda board: {})  # the plots are not what is tested here
    monkeypatch.setattr(report, "to_html", lambda board, pngs: "")
    out = root.parent / "lb"
    assert main(["leaderboard", "--records", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    skipped_lines = [line for line in err if "left out" in line]
    assert len(skipped_lines) == 1
    assert skipped_lines[0].startswith(f"platebench leaderboard: run {rid} in {root} left out: {path}: unreadable "
                                       "records file (")
    board = json.loads((out / "leaderboard.json").read_text())
    (skipped,) = board["skipped_runs"]
    assert skipped["run_id"] == rid and skipped["reason"].startswith(f"{path}: unreadable records file")
    m2 = _row(board, "m2")
    assert sorted(m2["per_seed"]) == ["0", "1"] and m2["mean"] == pytest.approx(_expected_mean("m2", (0, 1)))
    assert f"run {rid} in {root} left out: {path}: unreadable records file" in (out / "leaderboard.md").read_text()


def test_only_incomplete_runs_is_one_line_naming_one(tmp_path):
    root = Path(write_root(tmp_path / "store", datasets=("alpha",), methods=("erm",), seeds=(0,), sweeps=False,
                           with_done=False))
    with pytest.raises(HarnessError, match=rf"^no complete run under {root}: run {run_id('erm', 'alpha', 0)} "
                                           r"\(erm seed 0\) left out: no done marker"):
        sources.load([str(root)])


@pytest.mark.parametrize("edit,message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {**d, "run_id": "someone-else"}, "field 'run_id' says 'someone-else', the run's records say"),
    (lambda d: {**d, "seed": 7}, "field 'seed' says 7, the run's records say 1"),
    (lambda d: {**d, "selected_epoch": 1}, "field 'selected_epoch' says 1, the run's validation records select "
                                           "epoch 2"),
    (lambda d: {**d, "selected_epoch": "2"}, "field 'selected_epoch' must be an epoch >= 1, got '2'"),
    (lambda d: {**d, "final_metrics": {"epoch": 1}}, "field 'final_metrics.epoch' says the training ran 1 epoch(s), "
                                                     "but epoch 2 is selected or recorded"),
])
def test_an_edited_done_marker_is_an_error_naming_it(root, capsys, edit, message):
    rid = run_id("m2", "alpha", 1)
    path = root / "runs" / rid / "done.json"
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    assert main(["leaderboard", "--records", str(root), "--out", str(root.parent / "lb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"platebench leaderboard: error: {path}: ") and message in err and err.count("\n") == 1
