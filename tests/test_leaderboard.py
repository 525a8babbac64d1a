"""Leaderboard tables, report files and the CLI against a golden record fixture.

Fixture (written with harness.records.write_epoch_records): dataset synth/official, 3 epochs, splits
val (role val; batches b5, b6), test (cell types A, B), id_test (one cell type: Total only).
Standard track: erm, coral, mixstyle (2 hparams configs) on seeds 0-2; dsu on seeds 0-1 only.
TTA track: abra+tta on seeds 0-2, main evaluation at batch size 32 with 16 controls; like the trainer,
its sweeps are written once, at the best-validation epoch, in a separate file, and skip the main setting.
Validation peaks at epoch 2, test at epoch 3, so a table built from the test peak would show other numbers.
Every run has its done marker (selected epoch 2 of 3): the leaderboard command ranks complete runs only.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from leaderboard_fixtures import run_id as fixture_run_id
from leaderboard_fixtures import shared_test_value, write_root, write_shared_training
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.results.leaderboard import build_leaderboard
from platebench.harness.results.records import read_records, write_epoch_records
from platebench.harness.results.report import plot_names, to_html, to_markdown, write_report
from scipy import stats as sps

CURVE = {"val": {1: 0.30, 2: 0.40, 3: 0.35}, "test": {1: 0.20, 2: 0.25, 3: 0.45},
         "id_test": {1: 0.50, 2: 0.60, 3: 0.55}}
ROLE = {"val": "val", "test": "test", "id_test": "test", "train": "train"}
DOMAINS = {"val": [("cell_type", "A", 0.0), ("batch", "b5", -0.005), ("batch", "b6", 0.005)],
           "test": [("cell_type", "A", -0.01), ("cell_type", "B", 0.01), ("batch", "b7", -0.02),
                    ("batch", "b8", 0.02)],
           "id_test": [("cell_type", "A", 0.0), ("batch", "b1", 0.0)]}
SEED = {0: 0.0, 1: 0.01, 2: 0.03}
# (method, hparams JSON, track, method offset, seeds)
RUNS = [("erm", '{"lr":0.001}', "standard", 0.0, (0, 1, 2)),
        ("coral", '{"lambda":1.0}', "standard", -0.01, (0, 1, 2)),
        ("mixstyle", '{"p":0.5}', "standard", 0.02, (0, 1, 2)),
        ("mixstyle", '{"p":0.1}', "standard", -0.03, (0, 1, 2)),
        ("dsu", '{"p":0.5}', "standard", 0.01, (0, 1)),
        ("abra+tta", '{"eps":0.1}', "tta", 0.05, (0, 1, 2))]
NOISE = {("erm", 0): 0.0, ("erm", 1): 0.002, ("erm", 2): -0.001,
         ("coral", 0): 0.001, ("coral", 1): -0.004, ("coral", 2): 0.002,
         ("mixstyle", 0): 0.004, ("mixstyle", 1): -0.003, ("mixstyle", 2): 0.001,
         ("dsu", 0): 0.001, ("dsu", 1): 0.0,
         ("abra+tta", 0): -0.002, ("abra+tta", 1): 0.003, ("abra+tta", 2): 0.0}
MAIN_TTA = (32, 16)  # abra+tta's main (eval_batch_size, n_controls)
BATCH_SIZES = {8: -0.10, 0: 0.01}  # sweep offsets from the main accuracy
CONTROLS = {0: -0.02}


def total(method, seed, split, epoch, offset):
    return CURVE[split][epoch] + offset + SEED[seed] + NOISE[(method, seed)]


def _row(run_id, method, hp, track, seed, epoch, split, kind, domain, value, protocol="main", ebs=0, nc=0,
         metric="accuracy"):
    return dict(run_id=run_id, dataset="synth", dataset_checksum="sha-1", split_scheme="official", method=method,
                track=track, seed=seed, hparams=hp, epoch=epoch, split=split, split_role=ROLE[split],
                domain_kind=kind, domain=domain, eval_batch_size=ebs, n_controls=nc, protocol=protocol,
                metric=metric, value=value, n=120, code="0.1.0+test")


def build_records(root, runs=RUNS, drop=lambda r: False):
    for method, hp, track, off, seeds in runs:
        ebs, nc = MAIN_TTA if track == "tta" else (0, 0)
        for seed in seeds:
            run_id = f"{method}-{hp}-{seed}".replace('"', "").replace(":", "=")
            for epoch in (1, 2, 3):
                rows = [_row(run_id, method, hp, track, seed, epoch, "train", "all", "all", 0.9),
                        _row(run_id, method, hp, track, seed, epoch, "val", "all", "all", 1.5, metric="loss")]
                for split in CURVE:
                    t = total(method, seed, split, epoch, off)
                    rows.append(_row(run_id, method, hp, track, seed, epoch, split, "all", "all", t, ebs=ebs, nc=nc))
                    rows += [_row(run_id, method, hp, track, seed, epoch, split, k, d, t + o, ebs=ebs, nc=nc)
                             for k, d, o in DOMAINS[split]]
                write_epoch_records(str(root), run_id, epoch, [r for r in rows if not drop(r)])
            done = Path(root) / "runs" / run_id / "done.json"
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"run_id": run_id, "method": method, "seed": seed, "selected_epoch": 2,
                                        "final_metrics": {"epoch": 3}}))
            if track == "tta":
                t = total(method, seed, "test", 2, off)
                rows = [_row(run_id, method, hp, track, seed, 2, "test", "all", "all", t + o, "batch-size-sweep",
                             ebs=b, nc=nc) for b, o in BATCH_SIZES.items()]
                rows += [_row(run_id, method, hp, track, seed, 2, "test", "all", "all", t + o, "controls-sweep",
                              ebs=ebs, nc=c) for c, o in CONTROLS.items()]
                write_epoch_records(str(root), run_id, 2, rows, kind="sweeps")
    return str(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_records(tmp_path_factory.mktemp("records"))


@pytest.fixture(scope="module")
def board(store):
    return build_leaderboard(read_records(store))


def table(board, split, track):
    (t,) = [t for t in board["tables"] if t["split"] == split and t["track"] == track]
    return t


def rows(t):
    return {(r["method"], r["track"]): r for r in t["rows"]}


def per_seed(method, split, offset, seeds=(0, 1, 2), epoch=2):
    return [total(method, s, split, epoch, offset) for s in seeds]


def test_one_table_per_split_and_track(board):
    keys = {(t["dataset"], t["split_scheme"], t["split"], t["track"]) for t in board["tables"]}
    assert keys == {("synth", "official", s, tr) for s in ("val", "test", "id_test") for tr in ("standard", "tta")}
    std = table(board, "test", "standard")
    assert {r["method"] for r in std["rows"]} == {"erm", "coral", "mixstyle", "dsu"}  # no tta method
    assert std["selection"] == {"split": "val", "rule": "val"}
    assert std["baseline"] == "erm" and std["baseline_track"] == "standard"


def test_required_json_keys(board):
    for t in board["tables"]:
        assert {"dataset", "split_scheme", "split", "track", "baseline", "rows"} <= set(t)
        for r in t["rows"]:
            assert {"method", "per_seed", "mean", "std", "n", "p_paired_t", "p_wilcoxon", "diff_ci95",
                    "significant_holm", "complete"} <= set(r)


def test_numbers_at_the_validation_selected_epoch(board):
    r = rows(table(board, "test", "standard"))
    erm = per_seed("erm", "test", 0.0)
    mix = per_seed("mixstyle", "test", 0.02)
    assert r[("erm", "standard")]["per_seed"] == {"0": pytest.approx(0.25), "1": pytest.approx(0.262),
                                                  "2": pytest.approx(0.279)}
    assert set(r[("erm", "standard")]["epochs"].values()) == {2}
    m = r[("mixstyle", "standard")]
    assert [m["per_seed"][str(s)] for s in (0, 1, 2)] == pytest.approx(mix, abs=1e-12)
    assert m["mean"] == pytest.approx(np.mean(mix), abs=1e-12)
    assert m["std"] == pytest.approx(np.std(mix, ddof=1), abs=1e-12)
    assert m["n"] == 3
    assert m["p_paired_t"] == pytest.approx(sps.ttest_rel(mix, erm).pvalue, rel=1e-9)
    assert m["p_wilcoxon"] == pytest.approx(sps.wilcoxon(np.subtract(mix, erm)).pvalue, rel=1e-9)
    assert m["diff_mean"] == pytest.approx(np.mean(np.subtract(mix, erm)), abs=1e-12)
    ref = sps.ttest_rel(mix, erm).confidence_interval(0.95)
    assert m["diff_ci95"] == [pytest.approx(ref.low), pytest.approx(ref.high)]
    assert m["domains"]["B"]["mean"] == pytest.approx(np.mean(mix) + 0.01, abs=1e-12)
    base = r[("erm", "standard")]
    assert (base["p_paired_t"], base["p_wilcoxon"], base["diff_ci95"], base["significant_holm"]) == \
        (None, None, None, None)


def test_config_chosen_by_validation_and_recorded(board):
    m = rows(table(board, "test", "standard"))[("mixstyle", "standard")]
    assert m["hparams"] == {"p": 0.5}
    assert m["hparams_choice"]["rule"] == "best-mean-val" and m["hparams_choice"]["n_configs"] == 2
    assert m["trials"] is None


def test_holm_ranks_and_incomplete_rows(board):
    t = table(board, "test", "standard")
    r = rows(t)
    erm = per_seed("erm", "test", 0.0)
    p_mix = sps.ttest_rel(per_seed("mixstyle", "test", 0.02), erm).pvalue
    p_cor = sps.ttest_rel(per_seed("coral", "test", -0.01), erm).pvalue
    lo, hi = sorted([p_mix, p_cor])
    adj = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}  # Holm, m = 2 (dsu is incomplete)
    assert r[("mixstyle", "standard")]["p_holm"] == pytest.approx(adj[p_mix])
    assert r[("coral", "standard")]["p_holm"] == pytest.approx(adj[p_cor])
    assert r[("mixstyle", "standard")]["significant_holm"] == (adj[p_mix] <= 0.05)
    dsu = r[("dsu", "standard")]
    assert dsu["complete"] is False and dsu["rank"] is None and dsu["significant_holm"] is None
    assert "missing seed(s) [2]" in dsu["incomplete_reasons"][0]
    assert dsu["n"] == 2 and dsu["n_paired"] == 2  # its own seeds, tests on the shared ones
    assert dsu["p_paired_t"] == pytest.approx(sps.ttest_rel(per_seed("dsu", "test", 0.01, (0, 1)), erm[:2]).pvalue)
    assert [(x["method"], x["rank"]) for x in t["rows"]] == [("mixstyle", 1), ("erm", 2), ("coral", 3), ("dsu", None)]


def test_domain_columns_rule(board):
    assert (table(board, "test", "standard")["domain_kind"], table(board, "test", "standard")["domains"]) == \
        ("cell_type", ["A", "B"])
    assert (table(board, "val", "standard")["domain_kind"], table(board, "val", "standard")["domains"]) == \
        ("batch", ["b5", "b6"])
    assert (table(board, "id_test", "standard")["domain_kind"], table(board, "id_test", "standard")["domains"]) \
        == (None, [])


def test_tta_table_borrows_the_standard_baseline(board):
    t = table(board, "test", "tta")
    assert t["baseline_track"] == "standard"
    (ref, abra) = t["rows"]
    assert (ref["method"], ref["track"], ref["reference"], ref["rank"]) == ("erm", "standard", True, None)
    assert (abra["method"], abra["rank"]) == ("abra+tta", 1)
    a = per_seed("abra+tta", "test", 0.05)
    assert abra["p_paired_t"] == pytest.approx(sps.ttest_rel(a, per_seed("erm", "test", 0.0)).pvalue)
    assert abra["p_holm"] == pytest.approx(abra["p_paired_t"])  # one comparison
    assert (abra["eval_batch_size"], abra["n_controls"]) == ([32], [16])


def test_sweeps(board):
    by = {s["protocol"]: s for s in board["sweeps"]}
    assert set(by) == {"batch-size-sweep", "controls-sweep"}
    bs = by["batch-size-sweep"]
    assert (bs["split"], bs["track"], bs["parameter"]) == ("test", "tta", "eval_batch_size")
    (row,) = bs["rows"]
    pts = {p["value"]: p for p in row["points"]}
    a = per_seed("abra+tta", "test", 0.05)
    assert set(pts) == {0, 8, 32}
    for b, off in {**BATCH_SIZES, 32: 0.0}.items():
        assert pts[b]["mean"] == pytest.approx(np.mean(a) + off) and pts[b]["n"] == 3
        assert pts[b]["main"] is (b == 32)  # the main evaluation supplies its own setting's point
    ctl = {p["value"]: p for p in by["controls-sweep"]["rows"][0]["points"]}
    assert set(ctl) == {0, 16} and ctl[0]["mean"] == pytest.approx(np.mean(a) - 0.02)
    assert board["sweeps_left_out"] == []


def test_last_epoch_rule(store):
    b = build_leaderboard(read_records(store), rule="last-epoch")
    t = table(b, "test", "standard")
    assert t["selection"] == {"split": None, "rule": "last-epoch"}
    erm = rows(t)[("erm", "standard")]
    assert erm["mean"] == pytest.approx(np.mean(per_seed("erm", "test", 0.0, epoch=3)))
    # the sweeps were recorded at epoch 2 only: named as left out, not shown at another epoch
    assert b["sweeps"] == []
    assert sorted((x["seed"], x["selected_epoch"], x["sweep_epochs"]) for x in b["sweeps_left_out"]) == \
        [(0, 3, [2]), (1, 3, [2]), (2, 3, [2])]
    assert "Sweeps left out" in to_markdown(b)


def test_oracle_is_refused(store):
    with pytest.raises(HarnessError, match="oracle"):
        build_leaderboard(read_records(store), rule="oracle")


def test_best_configs_override(store):
    from platebench.harness.results.best_configs import parse

    b = build_leaderboard(read_records(store), best_configs=parse({"mixstyle": {"hparams": {"p": 0.1}, "trials": 24}}))
    m = rows(table(b, "test", "standard"))[("mixstyle", "standard")]
    assert (m["hparams"], m["trials"], m["hparams_choice"]["rule"]) == ({"p": 0.1}, 24, "best-configs")
    assert m["mean"] == pytest.approx(np.mean(per_seed("mixstyle", "test", -0.03)))


def test_missing_domain_marks_row_incomplete(tmp_path):
    runs = [RUNS[0], RUNS[2]]
    root = build_records(tmp_path, runs, drop=lambda r: r["method"] == "mixstyle" and r["seed"] == 1
                         and r["domain"] == "B")
    t = table(build_leaderboard(read_records(root)), "test", "standard")
    m = rows(t)[("mixstyle", "standard")]
    assert m["complete"] is False and m["rank"] is None
    assert m["incomplete_reasons"] == ["domain 'B' missing for seed(s) [1]"]
    assert m["domains"]["B"]["n"] == 2


def test_mixed_dataset_versions_and_duplicate_seeds_are_errors(tmp_path, store):
    recs = read_records(store)
    checksum = pc.if_else(pc.equal(recs.column("method"), "coral"), "sha-2", recs.column("dataset_checksum"))
    other = recs.set_column(recs.schema.get_field_index("dataset_checksum"), "dataset_checksum", checksum)
    with pytest.raises(HarnessError, match="different dataset versions"):
        build_leaderboard(other)
    dup = build_records(tmp_path, [RUNS[0], ("erm", '{"lr":0.001}', "standard", 0.0, (0,))])
    # same run id written twice is one run; a second run id for the same seed is a duplicate
    renamed = read_records(dup)
    assert len(build_leaderboard(renamed)["tables"]) == 3
    extra = build_records(tmp_path / "b", [("erm", '{"lr":0.001}', "standard", 0.0, (0, 1, 2))])
    write_epoch_records(extra, "erm-copy-0", 2, [dict(r, run_id="erm-copy-0") for r in
                                                  read_records(extra).to_pylist()
                                                  if r["run_id"].endswith("-0") and r["epoch"] == 2])
    with pytest.raises(HarnessError, match="two runs for seed 0"):
        build_leaderboard(read_records(extra))


@pytest.mark.slow  # plots
def test_write_report_files(board, tmp_path):
    files = write_report(board, str(tmp_path / "out"))
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "leaderboard.html"} <= set(names)
    pngs = [n for n in names if n.endswith(".png")]
    assert "acc-synth-official-test-standard.png" in pngs
    assert "sweep-synth-official-test-tta-eval_batch_size.png" in pngs
    assert "sweep-synth-official-test-tta-n_controls.png" in pngs
    assert "id-vs-ood-synth-official-standard-test.png" in pngs
    # tables, sweeps, ID-vs-OOD, and the standard track's critical-difference diagram (test and id_test are two
    # blocks); no cost plot: the fixture has no done markers
    assert "cd-standard.png" in pngs
    assert len(pngs) == 6 + 2 + 2 + 1
    out = tmp_path / "out"
    for n in pngs:
        assert (out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "leaderboard.json").read_text()) == json.loads(json.dumps(board))
    html = (out / "leaderboard.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "<style>" in html and "src='http" not in html
    md = (out / "leaderboard.md").read_text()
    assert "| 1 | mixstyle |" in md and "dsu †" in md and "† dsu: missing seed(s) [2]" in md
    assert "erm (standard track, baseline)" in md
    assert "| abra+tta | 21.4 ± 1.6 (3) | 31.4 ± 1.6 (3) [main] | 32.4 ± 1.6 (3) |" in md  # 8, 32, plate
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,split_scheme,split,split_role,track")
    n_rows = sum(len(t["rows"]) * (len(t["domains"]) + 1) for t in board["tables"])
    assert len(csv_lines) == 1 + n_rows


@pytest.mark.slow  # plots
def test_cli_end_to_end(store, tmp_path, capsys):
    (tmp_path / "best.json").write_text(json.dumps({"mixstyle": {"hparams": {"p": 0.5}, "trials": 12}}))
    out = tmp_path / "lb"
    rc = main(["leaderboard", "--records", store, "--out", str(out), "--best-configs", str(tmp_path / "best.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.startswith("# platebench leaderboard") and "wrote" in cap.err
    data = json.loads((out / "leaderboard.json").read_text())
    m = rows(table(data, "test", "standard"))[("mixstyle", "standard")]
    assert m["trials"] == 12
    assert data["settings"]["best_configs"] == str(tmp_path / "best.json")


def test_cli_reads_best_configs_next_to_records(tmp_path, capsys):
    root = build_records(tmp_path / "store", [RUNS[0], RUNS[2], RUNS[3]])
    (tmp_path / "store" / "best_configs.json").write_text(json.dumps({"mixstyle": {"hparams": {"p": 0.1},
                                                                                    "trials": 7}}))
    assert main(["leaderboard", "--records", root + "/records", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "o" / "leaderboard.json").read_text())
    assert rows(table(data, "test", "standard"))[("mixstyle", "standard")]["hparams"] == {"p": 0.1}


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["leaderboard", "--records", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no records under" in err and err.count("\n") == 1
    assert main(["leaderboard", "--records", store, "--out", str(tmp_path / "x"), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert "baseline 'nope' has no records" in err and err.count("\n") == 1
    bad = tmp_path / "bad"
    write_epoch_records(str(bad), "r", 1, [_row("r", "erm", "{}", "transductive", 0, 1, "val", "all", "all", 0.5)])
    assert main(["leaderboard", "--records", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "field 'track' has unknown value(s) ['transductive']" in err and err.count("\n") == 1
    (tmp_path / "bc.json").write_text("{not json")
    assert main(["leaderboard", "--records", store, "--out", str(tmp_path / "x"),
                 "--best-configs", str(tmp_path / "bc.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_same_checkpoint_row_reads_variant_and_parent_at_the_parents_epoch(tmp_path):
    # ERM selects epoch 2, AdaBN (trains as ERM) epoch 3. AdaBN also has test records at epoch 2 for seeds 0 and 1
    # (as when 2 is among its own selectable epochs), not for seed 2: that seed is missing, never read elsewhere.
    root = write_shared_training(tmp_path, test_epochs={("adabn", 0): {2, 3}, ("adabn", 1): {2, 3}})
    board = build_leaderboard(read_records(root))
    erm = rows(table(board, "test", "standard"))[("erm", "standard")]
    assert erm["epochs"] == {"0": 2, "1": 2, "2": 2}
    t = table(board, "test", "tta")
    own = rows(t)[("adabn", "tta")]
    assert own["kind"] == "own-selection" and own["epochs"] == {"0": 3, "1": 3, "2": 3}  # its own selection
    (same,) = t["same_checkpoint"]
    assert (same["kind"], same["method"], same["parent"], same["parent_track"]) == \
        ("same-checkpoint", "adabn", "erm", ["standard"])
    assert same["epochs"] == {"0": 2, "1": 2, "2": 2} and same["own_epochs"] == {"0": 3, "1": 3, "2": 3}
    a = [shared_test_value("adabn", s, 2) for s in (0, 1)]
    e = [shared_test_value("erm", s, 2) for s in (0, 1)]
    assert same["per_seed"] == {"0": pytest.approx(a[0]), "1": pytest.approx(a[1])}
    assert same["parent_per_seed"] == {"0": pytest.approx(e[0]), "1": pytest.approx(e[1])}
    assert list(same["missing_seeds"]) == ["2"] and "epoch 2" in same["missing_seeds"]["2"]
    assert same["n_paired"] == 2 and same["diff_mean"] == pytest.approx(np.mean(np.subtract(a, e)))
    assert same["p_paired_t"] == pytest.approx(sps.ttest_rel(a, e).pvalue)
    assert same["complete"] is False and same["significant_holm"] is None  # a missing seed: no Holm decision
    # the own-selection row compares adabn at epoch 3 with erm at epoch 2: another number
    assert own["diff_mean"] != pytest.approx(same["diff_mean"])
    md = to_markdown(board)
    assert "Same checkpoint · " in md and "| adabn † | erm | 0: 2, 1: 2, 2: 2 |" in md
    assert "† adabn seed 2: adabn has no test record at erm's selected epoch 2" in md
    # every seed evaluated at erm's epoch: complete, and Holm over the one same-checkpoint comparison
    full = write_shared_training(tmp_path / "full", test_epochs={("adabn", s): {2, 3} for s in (0, 1, 2)})
    (same,) = table(build_leaderboard(read_records(full)), "test", "tta")["same_checkpoint"]
    assert same["complete"] is True and same["missing_seeds"] == {} and same["p_holm"] == pytest.approx(
        same["p_paired_t"])


def test_differences_without_spread_get_no_p_value_and_no_holm_decision(tmp_path):
    # the merge fixture's seed offsets are the same for every method: each difference is constant over seeds
    root = write_root(tmp_path, datasets=("alpha",), methods=("erm", "m2", "m3"), with_done=False, sweeps=False)
    board = build_leaderboard(read_records(root))
    r = rows(table(board, "test", "standard"))
    for m in ("m2", "m3"):
        x = r[(m, "standard")]
        assert x["no_spread"] is True and x["complete"] is True
        assert (x["p_paired_t"], x["p_holm"], x["significant_holm"]) == (None, None, None)
        assert x["diff_ci95"][0] == pytest.approx(x["diff_ci95"][1])  # the interval itself has zero width
    assert r[("erm", "standard")]["no_spread"] is False
    md = to_markdown(board)
    assert "| 45.0 ± 1.0 (3) | -5.0 (no spread) | no spread | 0.25 | — |" in md  # Total, Δ, p, Wilcoxon, Holm
    assert "m2: no spread: every seed's difference is the same" in md


def _recode(root: str, run: str, code: str) -> None:
    recs = read_records(root).to_pylist()
    for epoch in sorted({r["epoch"] for r in recs if r["run_id"] == run}):
        write_epoch_records(root, run, epoch, [dict(r, code=code) for r in recs
                                               if r["run_id"] == run and r["epoch"] == epoch])


def test_mixed_code_is_refused_unless_allowed_then_marked(tmp_path, capsys):
    root = write_root(tmp_path / "store", datasets=("alpha",), methods=("erm", "m2"), sweeps=False)  # done markers
    _recode(root, fixture_run_id("m2", "alpha", 1), "0.2.0+other")
    with pytest.raises(HarnessError, match=r"m2 \(0\.1\.0\+fixture, 0\.2\.0\+other\)"):
        build_leaderboard(read_records(root))
    assert main(["leaderboard", "--records", root, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "m2 (0.1.0+fixture, 0.2.0+other)" in err and "--allow-mixed-code" in err and err.count("\n") == 1
    board = build_leaderboard(read_records(root), allow_mixed_code=True)
    r = rows(table(board, "test", "standard"))
    assert r[("m2", "standard")]["mixed_code"] == ["0.1.0+fixture", "0.2.0+other"]
    assert r[("erm", "standard")]["mixed_code"] is None
    assert board["settings"]["allow_mixed_code"] is True
    assert board["settings"]["mixed_code"] == {"m2": ["0.1.0+fixture", "0.2.0+other"]}
    md = to_markdown(board)
    assert "| m2 § |" in md and "§ m2: runs of different code identities (0.1.0+fixture, 0.2.0+other)" in md
    page = to_html(board, {name: b"" for name in plot_names(board)})
    assert "<td>m2 §</td>" in page


@pytest.mark.slow  # plots
def test_cli_allow_mixed_code(tmp_path, capsys):
    root = write_root(tmp_path / "store", datasets=("alpha",), methods=("erm", "m2"), sweeps=False)  # done markers
    _recode(root, fixture_run_id("m2", "alpha", 1), "0.2.0+other")
    out = tmp_path / "lb"
    assert main(["leaderboard", "--records", root, "--out", str(out), "--allow-mixed-code"]) == 0
    capsys.readouterr()
    data = json.loads((out / "leaderboard.json").read_text())
    assert rows(table(data, "test", "standard"))[("m2", "standard")]["mixed_code"] == ["0.1.0+fixture",
                                                                                       "0.2.0+other"]
