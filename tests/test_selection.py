"""Epoch and config selection: never from a test split, ties to the earliest epoch, configs never mixed."""

import json
import random

import pyarrow as pa
import pytest
from platebench.harness.errors import HarnessError
from platebench.harness.results.best_configs import parse as parse_best_configs
from platebench.harness.results.configs import choose_configs
from platebench.harness.results.records import read_records, records_table, validate, write_epoch_records
from platebench.harness.results.selection import select_epoch, selected_results

# val peaks at epoch 2, test at epoch 3, id_test at epoch 1: any rule reading a test split would move.
VAL = {1: 0.30, 2: 0.40, 3: 0.35}
TEST = {1: 0.20, 2: 0.25, 3: 0.45}
ID_TEST = {1: 0.60, 2: 0.50, 3: 0.55}


def row(run_id="r0", epoch=1, split="val", role="val", kind="all", domain="all", value=0.5, metric="accuracy",
        protocol="main", seed=0, method="erm", hparams='{"lr":0.001}', track="standard", ebs=0, nc=0):
    return dict(run_id=run_id, dataset="synth", dataset_checksum="abc", split_scheme="official", method=method,
                track=track, seed=seed, hparams=hparams, epoch=epoch, split=split, split_role=role,
                domain_kind=kind, domain=domain, eval_batch_size=ebs, n_controls=nc, protocol=protocol,
                metric=metric, value=value, n=100, code="0.1.0+test")


def run_rows(run_id="r0", offset=0.0, **kw):
    rows = []
    for e in (1, 2, 3):
        rows.append(row(run_id, e, "val", "val", value=VAL[e] + offset, **kw))
        rows.append(row(run_id, e, "val", "val", "batch", "b5", VAL[e] + offset, **kw))
        rows.append(row(run_id, e, "test", "test", value=TEST[e] + offset, **kw))
        rows.append(row(run_id, e, "test", "test", "cell_type", "HEPG2", TEST[e] + offset - 0.01, **kw))
        rows.append(row(run_id, e, "id_test", "test", value=ID_TEST[e] + offset, **kw))
        rows.append(row(run_id, e, "train", "train", value=0.9 + e / 100, **kw))
        rows.append(row(run_id, e, "val", "val", value=5.0 - e, metric="loss", **kw))
    return rows


def test_val_selection_picks_validation_peak():
    sel = select_epoch(run_rows())
    assert (sel.epoch, sel.split, sel.rule, sel.value) == (2, "val", "val", 0.40)


def test_selection_never_reads_test_splits():
    rows = run_rows()
    rng = random.Random(0)
    for _ in range(20):
        mutated = [dict(r, value=rng.random()) if r["split_role"] == "test" else r for r in rows]
        assert select_epoch(mutated).epoch == 2
        table = selected_results(records_table(mutated))
        assert set(table.column("epoch").to_pylist()) == {2}


def test_selection_ignores_non_overall_non_main_and_loss_rows():
    rows = run_rows()
    rows.append(row(epoch=1, kind="batch", domain="b6", value=0.99))  # a per-domain val peak
    rows.append(row(epoch=1, protocol="batch-size-sweep", ebs=8, value=0.99))  # a sweep val peak
    rows.append(row(epoch=3, split="val", metric="loss", value=99.0))  # loss is not accuracy
    assert select_epoch(rows).epoch == 2


def test_ties_go_to_earliest_epoch():
    rows = [row(epoch=e, value=v) for e, v in [(1, 0.3), (2, 0.4), (3, 0.4), (4, 0.2)]]
    assert select_epoch(rows).epoch == 2


def test_last_epoch_and_oracle():
    rows = run_rows()
    last = select_epoch(rows, "last-epoch")
    assert (last.epoch, last.split, last.value) == (3, None, None)
    oracle = select_epoch(rows, "oracle", oracle_split="test")
    assert (oracle.epoch, oracle.split, oracle.value) == (3, "test", 0.45)
    with pytest.raises(HarnessError, match="oracle_split"):
        select_epoch(rows, "oracle")
    with pytest.raises(HarnessError, match="unknown selection rule 'best'"):
        select_epoch(rows, "best")


def test_no_validation_rows_is_an_error():
    rows = [r for r in run_rows() if r["split_role"] != "val"]
    with pytest.raises(HarnessError, match="run r0: no validation accuracy"):
        select_epoch(rows)


def test_selected_results_rows_at_the_selected_epoch(tmp_path):
    for e in (1, 2, 3):
        write_epoch_records(str(tmp_path), "r0", e, [r for r in run_rows() if r["epoch"] == e])
    t = selected_results(read_records(str(tmp_path)))
    got = {(r["split"], r["domain_kind"], r["domain"]): r["value"] for r in t.to_pylist()}
    assert got == {("val", "all", "all"): 0.40, ("val", "batch", "b5"): 0.40, ("test", "all", "all"): 0.25,
                   ("test", "cell_type", "HEPG2"): pytest.approx(0.24), ("id_test", "all", "all"): 0.50}
    assert set(t.column("selection_rule").to_pylist()) == {"val"}
    assert set(t.column("selection_split").to_pylist()) == {"val"}
    last = selected_results(read_records(str(tmp_path)), "last-epoch")
    assert {r["split"]: r["value"] for r in last.to_pylist() if r["domain_kind"] == "all"} == \
        {"val": 0.35, "test": 0.45, "id_test": 0.55}


def test_oracle_selects_each_split_on_itself():
    t = selected_results(records_table(run_rows()), "oracle").to_pylist()
    by = {r["split"]: (r["epoch"], r["value"]) for r in t if r["domain_kind"] == "all"}
    assert by == {"val": (2, 0.40), "test": (3, 0.45), "id_test": (1, 0.60)}
    assert {r["selection_rule"] for r in t} == {"oracle"}


def test_duplicate_main_accuracy_is_an_error():
    rows = run_rows() + [row(epoch=2, split="test", role="test", value=0.1, ebs=64)]
    with pytest.raises(HarnessError, match="duplicate main accuracy for split 'test'"):
        selected_results(records_table(rows))


def test_validate_refuses_unknown_values_and_inconsistent_runs():
    with pytest.raises(HarnessError, match="field 'track' has unknown value"):
        validate(records_table([row(track="transductive")]))
    with pytest.raises(HarnessError, match="run r0 has rows with different seed"):
        validate(records_table([row(), row(epoch=2, seed=1)]))
    with pytest.raises(HarnessError, match="domain 'b5' with domain_kind 'all'"):
        validate(records_table([row(domain="b5")]))
    with pytest.raises(HarnessError, match="'hparams' is not JSON"):
        validate(records_table([row(hparams="lr=1")]))
    with pytest.raises(HarnessError, match="epoch"):
        validate(records_table([row(epoch=0)]))


def _two_config_rows():
    rows = []
    for seed in (0, 1, 2):
        rows += run_rows(f"good-{seed}", 0.05 * (seed == 0), seed=seed, method="mixstyle", hparams='{"p":0.5}')
        rows += run_rows(f"bad-{seed}", -0.02, seed=seed, method="mixstyle", hparams='{"p":0.1}')
    # a third config with the best single-seed score (0.46) but the worst seed too: the mean decides
    rows += run_rows("lucky-0", 0.06, seed=0, method="mixstyle", hparams='{"p":0.9}')
    rows += run_rows("lucky-1", -0.05, seed=1, method="mixstyle", hparams='{"p":0.9}')
    return records_table(rows)


def test_choose_configs_best_mean_validation():
    sel = selected_results(_two_config_rows())
    c = choose_configs(sel)[("synth", "official", "mixstyle", "standard")]
    # means: p=0.5 0.40 + 0.05/3 = 0.4167; p=0.9 (0.46 + 0.35) / 2 = 0.405; p=0.1 0.38
    assert json.loads(c.hparams) == {"p": 0.5}
    assert (c.rule, c.n_configs, c.trials) == ("best-mean-val", 3, None)
    assert c.val_mean == pytest.approx(0.40 + 0.05 / 3)


def test_choose_configs_with_best_configs_mapping():
    sel = selected_results(_two_config_rows())
    c = choose_configs(sel, parse_best_configs({"mixstyle": {"hparams": {"p": 0.1}, "trials": 20}}))
    got = c[("synth", "official", "mixstyle", "standard")]
    assert (json.loads(got.hparams), got.rule, got.trials) == ({"p": 0.1}, "best-configs", 20)
    assert got.val_mean == pytest.approx(0.38)
    c2 = choose_configs(sel, parse_best_configs({"mixstyle": {"hparams": '{"p": 0.5}', "trials": 3}}))  # JSON str
    assert json.loads(c2[("synth", "official", "mixstyle", "standard")].hparams) == {"p": 0.5}
    with pytest.raises(HarnessError, match="config .* has no records"):
        choose_configs(sel, parse_best_configs({"mixstyle": {"hparams": {"p": 0.3}, "trials": 3}}))
    with pytest.raises(HarnessError, match=r"method\(s\) \['dsu'\] have no records"):
        choose_configs(sel, parse_best_configs({"dsu": {"hparams": {}, "trials": 3}}))


def test_parse_best_configs_is_strict():
    with pytest.raises(HarnessError, match="unknown key"):
        parse_best_configs({"erm": {"hparams": {}, "trials": 3, "trails": 3}})
    with pytest.raises(HarnessError, match="'trials' must be a positive integer"):
        parse_best_configs({"erm": {"hparams": {}, "trials": "20"}})
    with pytest.raises(HarnessError, match="expected an object with keys 'hparams' and 'trials'"):
        parse_best_configs({"erm": {"lr": 1}})
    with pytest.raises(HarnessError, match="'value' has the wrong type"):
        parse_best_configs({"erm": {"hparams": {}, "trials": 2, "value": "high"}})


def test_what_a_sweep_writes_the_leaderboard_reads(tmp_path):
    """One schema: the sweep's writer output parses, with every field it wrote."""
    from platebench.harness.train.runner import Launch
    from platebench.harness.tune import sweep

    best = {"method": "abra", "hparams": {"lr": 0.001}, "trials": 8, "value": 0.61, "selection_split": "val",
            "selection_rule": "ood-validation", "experiment": "sweep-abra-x"}
    path = sweep.write_best(best, Launch(storage=str(tmp_path)))
    (got,) = parse_best_configs(json.loads(open(path).read())).values()
    assert (got.hparams, got.trials, got.value, got.selection_rule, got.experiment) == \
        ({"lr": 0.001}, 8, 0.61, "ood-validation", "sweep-abra-x")


def test_empty_table_selects_nothing():
    from platebench.harness.results.records import RECORD_SCHEMA

    assert len(selected_results(RECORD_SCHEMA.empty_table())) == 0
    assert isinstance(selected_results(RECORD_SCHEMA.empty_table()), pa.Table)


def test_validate_refuses_nan_and_nulls():
    with pytest.raises(HarnessError, match="field 'value' is nan"):
        validate(records_table([row(value=float("nan"))]))
    with pytest.raises(HarnessError, match="field 'seed' has 1 empty"):
        validate(records_table([row(seed=None)]))


def test_val_loss_selects_the_lowest_validation_loss_and_reports_the_test_splits_there():
    rows = run_rows()  # validation loss lowest at epoch 3, validation accuracy highest at epoch 2
    assert select_epoch(rows, "val-loss").epoch == 3 and select_epoch(rows, "val").epoch == 2
    table = selected_results(records_table(rows), "val-loss")
    got = {(r["split"], r["domain_kind"]): r["value"] for r in table.to_pylist()}
    assert got[("test", "all")] == TEST[3] and got[("id_test", "all")] == ID_TEST[3]
