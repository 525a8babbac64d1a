"""Merging several sources into one leaderboard, and the overall ranking across datasets and test splits.

Synthetic roots (tests/leaderboard_fixtures.py): no training. What could go wrong: a run found twice counted twice
(n doubled), two different results under one run id silently mixed, two dataset versions in one table, the
overall ranks or the Friedman p-value not what an independent computation gives, an overall table made from a
single block.
"""

import json
import shutil

import numpy as np
import pytest
from leaderboard_fixtures import BLOCK_MEANS, run_id, write_root
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.results import sources
from platebench.harness.results.leaderboard import build_leaderboard
from platebench.harness.results.records import read_records
from platebench.harness.results.report import plot_names, to_html, to_markdown
from scipy import stats as sps

STANDARD = ("erm", "m1", "m2", "m3")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("full") / "root")


def _board(*urls):
    m = sources.load(list(urls))
    board = build_leaderboard(m.records, sources=m.sources, done=m.done)
    board["settings"]["sources"] = m.labels
    return board


def _table(board, ds, split, track="standard"):
    (t,) = [t for t in board["tables"] if (t["dataset"], t["split"], t["track"]) == (ds, split, track)]
    return {r["method"]: r for r in t["rows"]}


def test_a_run_in_two_sources_counts_once_and_names_both(full, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(full, copy)
    # a third source with only m3's seeds: m3 rows come from two sources, erm's from two
    part = write_root(tmp_path / "part", datasets=("alpha",), methods=("m3",))
    single = _board(full)
    merged = _board(full, copy, part)
    a, b = _table(single, "alpha", "test"), _table(merged, "alpha", "test")
    for method in STANDARD:
        assert b[method]["n"] == a[method]["n"] == 3  # n unchanged: one run per seed
        assert b[method]["per_seed"] == a[method]["per_seed"]
        assert b[method]["run_ids"] == a[method]["run_ids"]
    assert b["erm"]["sources"] == [full, copy]
    assert b["m3"]["sources"] == [full, copy, part]
    assert a["erm"]["sources"] == [full]
    md = to_markdown(merged)
    assert f"S1 = {full}; S2 = {copy}; S3 = {part}" in md
    assert "| Sources |" in md and "| S1, S2, S3 |" in md
    assert "<th>Sources</th>" in to_html(merged, {n: b"" for n in plot_names(merged)})
    assert "| Sources |" not in to_markdown(single)  # one source: a sentence, not a column
    assert f"Runs from {full}." in to_markdown(single)


def test_same_run_id_with_different_numbers_is_refused_naming_both_sources(full, tmp_path, capsys):
    other = write_root(tmp_path / "other", datasets=("alpha",), methods=("m2",), seeds=(1,),
                       perturb={run_id("m2", "alpha", 1): 0.01})
    with pytest.raises(HarnessError) as e:
        sources.load([full, other])
    msg = str(e.value)
    assert f"run {run_id('m2', 'alpha', 1)}: {full} and {other} hold different numbers" in msg
    assert "epoch 1 split 'id_test'" in msg  # the first differing row, named
    rc = main(["leaderboard", "--records", full, other, "--out", str(tmp_path / "lb")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and full in err and other in err


def test_one_dataset_and_scheme_with_two_checksums_is_refused_naming_both(full, tmp_path):
    # other run ids (seed 5), same dataset name and scheme, another dataset version
    other = write_root(tmp_path / "v2", datasets=("beta",), methods=("erm",), seeds=(0,), checksum={"beta": "c" * 64})
    shutil.move(str(tmp_path / "v2" / "records" / run_id("erm", "beta", 0)), str(tmp_path / "v2" / "records" / "x"))
    with pytest.raises(HarnessError, match=rf"dataset 'beta' scheme 's2': {full} and {other} hold different dataset "
                                           r"versions \(checksum bbbbbbbbbbbbbbbb… in .*, cccccccccccccccc…"):
        sources.load([full, other])


def _independent_ranks(block_means: dict[tuple, dict[str, float]], methods) -> np.ndarray:
    """Rank 1 = best; tied methods share the mean of the places they occupy (written out, not scipy)."""
    out = []
    for means in block_means.values():
        row = []
        for m in methods:
            better = sum(1 for o in methods if means[o] > means[m])
            ties = sum(1 for o in methods if means[o] == means[m])
            row.append(better + (ties + 1) / 2)
        out.append(row)
    return np.array(out)


def test_overall_average_ranks_and_friedman_match_an_independent_computation(full):
    board = _board(full)
    (o,) = board["overall"]  # the tta track has one method: no ranking, said in settings
    assert o["track"] == "standard"
    assert any("tta track: no overall ranking" in n for n in board["settings"]["overall"]["notes"])
    blocks = {b: {m: v for m, v in means.items() if m in STANDARD} for b, means in BLOCK_MEANS.items()}
    labels = ["/".join(b) for b in blocks]
    assert sorted(o["block_labels"]) == sorted(labels)
    # the table's numbers are means over seeds; check them, then rank them independently
    for r in o["rows"]:
        for b, lab in zip(blocks, labels):
            assert r["accuracy"][lab] == pytest.approx(blocks[b][r["method"]], abs=1e-12)
    measured = {b: {r["method"]: r["accuracy"]["/".join(b)] for r in o["rows"]} for b in blocks}
    ranks = _independent_ranks(measured, STANDARD)
    assert ranks[labels.index("alpha/s1/id_test")].tolist() == [3, 1.5, 1.5, 4]  # the tie
    expected = dict(zip(STANDARD, ranks.mean(axis=0)))
    assert {r["method"]: r["average_rank"] for r in o["rows"]} == pytest.approx(expected)
    assert [r["method"] for r in o["rows"]] == sorted(STANDARD, key=lambda m: (expected[m], m))
    ref = sps.friedmanchisquare(*ranks.T)
    assert o["friedman"]["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert o["friedman"]["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert (o["friedman"]["k"], o["friedman"]["n_blocks"]) == (4, 4)
    q = sps.studentized_range.ppf(0.95, 4, np.inf) / np.sqrt(2)
    assert o["critical_difference"] == pytest.approx(q * np.sqrt(4 * 5 / (6 * 4)))
    md = to_markdown(board)
    assert "## Overall ranking · standard track" in md and f"p = {ref.pvalue:.3g}" in md


def test_a_method_missing_a_block_is_left_out_by_name(tmp_path):
    root = write_root(tmp_path / "r", methods=("erm", "m1", "m2"))
    write_root(tmp_path / "r", datasets=("alpha",), methods=("m3",))
    (o,) = _board(root)["overall"]
    assert o["methods"] == sorted(o["methods"], key=lambda m: next(r["average_rank"] for r in o["rows"]
                                                                   if r["method"] == m))
    assert "m3" not in o["methods"]
    assert o["left_out"] == [{"method": "m3", "missing": ["beta/s2/test", "beta/s2/id_test"]}]


def test_a_single_dataset_scheme_and_split_makes_no_overall_table(tmp_path):
    root = write_root(tmp_path / "r", datasets=("alpha",), methods=("erm", "m1", "m2"))
    # drop id_test: one test block left
    recs = read_records(root)
    import pyarrow.compute as pc

    board = build_leaderboard(recs.filter(pc.not_equal(recs.column("split"), "id_test")))
    assert board["overall"] == []
    assert board["settings"]["overall"]["notes"] == [
        "no overall ranking: the leaderboard has a single (dataset, scheme, test split) (alpha/s1/test)"]
    assert "Overall ranking" not in to_markdown(board)


def test_leaderboard_json_rows_carry_sources_through_the_cli(tmp_path, capsys):
    full = write_root(tmp_path / "small", datasets=("alpha",), methods=("erm", "m1"), seeds=(0, 1))
    copy = str(tmp_path / "copy")
    shutil.copytree(full, copy)
    assert main(["leaderboard", "--records", full, copy, "--out", str(tmp_path / "lb")]) == 0
    err = capsys.readouterr().err
    assert "counted once" in err
    data = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert data["settings"]["sources"] == [full, copy]
    assert all(r["sources"] == [full, copy] for t in data["tables"] for r in t["rows"])
    assert all(r["sources"] == [full, copy] for c in data["cost"] for r in c["rows"])
