"""Representation analysis (harness/representation.py): metrics on profiles of known structure, the BN-shift
statistics, and one end-to-end call on a tiny dataset with an untrained method."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from platebench.datasets.shards import open_dataset
from platebench.harness.analysis import bn_shift
from platebench.harness.analysis import representation as rep
from platebench.harness.data.stream import PartCache, PlateStream, StreamConfig
from platebench.harness.results.records import records_table, validate
from platebench.harness.results.vocabulary import METRICS, PROTOCOLS
from platebench.harness.train.evaluate import Evaluator
from platebench.harness.train.runspec import build_specs, task_spec
from platebench.methods import get_method
from platebench.methods.base import BatchShape
from shard_fixtures import build_tiny_dataset


def _clusters(separated: bool, n_batches=3, per_batch=60, dim=8, seed=0):
    """Profiles labelled by batch: far-apart clusters per batch, or one shared distribution."""
    rng = np.random.default_rng(seed)
    batches = np.repeat([f"b{i}" for i in range(n_batches)], per_batch)
    x = rng.normal(size=(len(batches), dim))
    if separated:
        x += 20.0 * np.eye(dim)[np.repeat(np.arange(n_batches), per_batch)]
    return x, batches


def _plates(features_of, n_plates=4, perts=("p0", "p1", "p2", "p3"), reps=3, controls=4, seed=0):
    """Well metadata of `n_plates` plates (each perturbation `reps` times, `controls` control wells) and features
    from `features_of(rng, perturbation index or -1)`."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for p in range(n_plates):
        wells = [(k, pert) for k, pert in enumerate(perts) for _ in range(reps)] + [(-1, "DMSO")] * controls
        for w, (k, pert) in enumerate(wells):
            rows.append({"plate": f"P{p}", "well": f"W{w:02d}", "batch": f"B{p % 2}", "source": "s",
                         "cell_type": "c", "perturbation": pert, "label": k // 2 if k >= 0 else -1,
                         "is_control": k < 0})
            feats.append(features_of(rng, k))
    return pd.DataFrame(rows), np.asarray(feats)


def _distinct(rng, k, dim=16):
    """Controls, each class and (less) each perturbation in their own directions, tiny noise: replicates and
    classes perfectly separated."""
    if k < 0:
        return 10.0 * np.eye(dim)[0] + rng.normal(scale=0.01, size=dim)
    return 10.0 * np.eye(dim)[1 + k // 2] + 2.0 * np.eye(dim)[4 + k] + rng.normal(scale=0.01, size=dim)


@pytest.mark.slow  # copairs / scikit-learn / harmonypy: seconds
def test_mixing_scores_move_with_the_batch_effect_and_equal_the_libraries_values():
    from harmonypy import compute_lisi
    from sklearn.metrics import silhouette_samples

    sep_x, sep_b = _clusters(True)
    mix_x, mix_b = _clusters(False)
    one_label = np.zeros(len(sep_b), dtype=int)
    assert rep.silhouette_batch(sep_x, sep_b, one_label) < 0.2 < 0.8 < rep.silhouette_batch(mix_x, mix_b, one_label)
    assert rep.graph_connectivity(sep_x, one_label) < 0.4 < 0.99 < rep.graph_connectivity(mix_x, one_label)
    assert rep.ilisi(sep_x, sep_b) < 0.05 < 0.7 < rep.ilisi(mix_x, mix_b)
    for x, b in ((sep_x, sep_b), (mix_x, mix_b)):
        # one label: scib's batch ASW is the mean of 1 - |s_i| over all profiles
        assert rep.silhouette_batch(x, b, one_label) == pytest.approx(np.mean(1 - np.abs(silhouette_samples(x, b))))
        lisi = compute_lisi(x, pd.DataFrame({"batch": b}), ["batch"], perplexity=30)[:, 0]
        assert rep.ilisi(x, b) == pytest.approx((lisi.mean() - 1) / 2)
    assert rep.silhouette_batch(sep_x, np.full(len(sep_b), "b0"), one_label) is None  # one batch: nothing to mix
    assert rep.ilisi(sep_x, np.full(len(sep_b), "b0")) is None


def _silhouette_by_hand(x: np.ndarray, batches: list[str]) -> np.ndarray:
    """Rousseeuw's silhouette of each point against its batch: a = mean distance to the other points of its
    batch, b = the smallest mean distance to another batch's points, s = (b - a) / max(a, b); 0 alone in its batch."""
    d = np.abs(x[:, None] - x[None, :]) if x.ndim == 1 else np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    batches = np.asarray(batches)
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = (batches == batches[i]) & (np.arange(len(x)) != i)
        if not own.any():
            continue
        a = d[i, own].mean()
        b = min(d[i, batches == other].mean() for other in set(batches) - {batches[i]})
        s[i] = (b - a) / max(a, b)
    return s


def test_silhouette_batch_is_scibs_per_label_batch_asw():
    """scib's batch ASW (scale=True): per label, mean of 1 - |s_i| with s_i the silhouette against batch within
    the label; mean over labels; labels in one batch, or with one profile per batch, are skipped."""
    x = np.array([0.0, 1.0, 3.0, 5.0,  # label a: batches A A B B
                  0.0, 0.5, 2.0,  # label b: A B A (B alone in its batch: s = 0)
                  7.0, 9.0,  # label c: one batch only -> skipped
                  4.0, 40.0])  # label d: one profile per batch -> skipped
    batches = ["A", "A", "B", "B", "A", "B", "A", "A", "A", "A", "B"]
    labels = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2
    per_label = [np.mean(1 - np.abs(_silhouette_by_hand(x[:4], batches[:4]))),
                 np.mean(1 - np.abs(_silhouette_by_hand(x[4:7], batches[4:7])))]
    assert rep.silhouette_batch(x[:, None], batches, labels) == pytest.approx(np.mean(per_label))
    # skipped labels only: no score
    assert rep.silhouette_batch(x[7:, None], batches[7:], labels[7:]) is None

    # perfectly mixed: four equidistant points (a regular simplex), two per batch, so a_i = b_i and s_i = 0
    assert rep.silhouette_batch(np.eye(4), ["A", "A", "B", "B"], ["l"] * 4) == pytest.approx(1.0)
    # perfectly separated: each batch one point repeated, so a_i = 0 and s_i = 1
    separated = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    assert rep.silhouette_batch(separated, ["A", "A", "B", "B"], ["l"] * 4) == pytest.approx(0.0)


def test_graph_connectivity_is_scibs_largest_component_share():
    """scib's graph connectivity: per label, |largest connected component of the kNN graph restricted to the
    label| / |label|, mean over labels. With 2 neighbours (the point and its nearest one) on the line
    0, 1, 5, 6, 20 the undirected edges are 0-1, 5-6, 6-20: label a = {0, 1, 5, 20} splits into {0, 1}, {5},
    {20} (2 of 4); label b = {6} is whole (1 of 1)."""
    x = np.array([[0.0], [1.0], [5.0], [6.0], [20.0]])
    labels = ["a", "a", "a", "b", "a"]
    assert rep.graph_connectivity(x, labels, n_neighbors=2) == pytest.approx((2 / 4 + 1 / 1) / 2)
    # three neighbours: 0-1, 0-5, 1-5, 5-6, 1-6, 6-20, 5-20, so label a is one component
    assert rep.graph_connectivity(x, labels, n_neighbors=3) == pytest.approx(1.0)
    # two batches far apart, five profiles each, one label: two components of 5
    split = np.concatenate([np.arange(5.0), 100 + np.arange(5.0)])[:, None]
    assert rep.graph_connectivity(split, ["l"] * 10, n_neighbors=3) == pytest.approx(0.5)


@pytest.mark.slow  # copairs / scikit-learn / harmonypy: seconds
def test_map_is_one_for_separated_replicates_and_near_chance_for_random_profiles():
    meta, x = _plates(_distinct)
    activity = rep.activity_map(meta, x, null_size=2000)
    assert activity == (pytest.approx(1.0), pytest.approx(1.0), 4)
    assert rep.consistency_map(meta, x) == pytest.approx(1.0)

    from copairs.map.normalization import expected_ap

    meta, x = _plates(lambda rng, k: rng.normal(size=16), n_plates=8)
    mean_ap, retrieved, n = rep.activity_map(meta, x, null_size=2000)
    # chance: each treated well ranks its 23 replicates (any plate) against its plate's 4 controls
    assert abs(mean_ap - expected_ap(23, 4)) < 0.04 and retrieved <= 0.25 and n == 4
    # consensus profiles (perturbation x plate): 16 per class, 2 perturbations a class, so 8 positives (the other
    # perturbation's) and 16 negatives each
    assert abs(rep.consistency_map(meta, x) - expected_ap(8, 16)) < 0.1


def _consensus_frame(profiles: dict[str, tuple[int, np.ndarray]], plates=("P0", "P1")):
    """One treated well per (plate, perturbation), so each is its own consensus profile: {pert: (class, x)}."""
    rows = [{"plate": p, "perturbation": pert, "label": k, "is_control": False}
            for p in plates for pert, (k, _) in profiles.items()]
    return pd.DataFrame(rows), np.array([v for _ in plates for _, v in profiles.values()])


def test_consistency_positives_are_other_perturbations_of_the_class_not_replicates():
    """JUMP's consistency: a consensus profile must retrieve its class's OTHER perturbations."""
    def at(deg):
        return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])

    # each class has one perturbation: the only same-class profile is the replicate on the other plate, which
    # is not a positive, so there is nothing to score (counting replicates would give mAP 1)
    meta, x = _consensus_frame({"pA": (0, at(0)), "pC": (1, at(90))})
    assert rep.consistency_map(meta, x) is None
    # classes {pA, pB}, {pC, pD} on a circle: for every query its replicate (cos 1) ranks first, then the other
    # class's nearest perturbation (cos 0.5, 2 plates), then its class's other perturbation (cos -0.5, 2 plates:
    # the positives), then the opposite one (cos -1). AP = (1/3 + 2/4) / 2; with replicates as positives it
    # would be (1/1 + 2/4 + 3/5) / 3 = 0.7
    meta, x = _consensus_frame({"pA": (0, at(0)), "pC": (1, at(60)), "pD": (1, at(180)), "pB": (0, at(240))})
    assert rep.consistency_map(meta, x) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_average_precision_equals_copairs_own():
    from copairs.map import average_precision as copairs_ap

    meta, x = _plates(lambda rng, k: rng.normal(size=16) + (k + 1))
    df = meta[["plate", "perturbation"]].copy()
    kw = {"pos_sameby": ["perturbation"], "pos_diffby": [], "neg_sameby": ["plate"], "neg_diffby": ["perturbation"]}
    ours, theirs = rep.average_precision(df, x, **kw), copairs_ap(df, x, distance="cosine", progress_bar=False, **kw)
    np.testing.assert_allclose(ours["average_precision"], theirs["average_precision"])
    assert (ours["n_pos_pairs"] == theirs["n_pos_pairs"]).all()
    assert (ours["n_total_pairs"] == theirs["n_total_pairs"]).all()


def test_symmetric_kl_equals_the_closed_form_and_mmd_is_zero_for_identical_samples():
    mp, vp, mq, vq = np.array([0.0, 1.0, -2.0]), np.array([1.0, 0.5, 3.0]), np.array([0.5, 1.0, 1.0]), \
        np.array([2.0, 0.5, 0.25])
    p = torch.distributions.Normal(torch.tensor(mp), torch.tensor(vp).sqrt())
    q = torch.distributions.Normal(torch.tensor(mq), torch.tensor(vq).sqrt())
    jeffreys = torch.distributions.kl_divergence(p, q) + torch.distributions.kl_divergence(q, p)
    np.testing.assert_allclose(rep.symmetric_kl(mp, vp, mq, vq), jeffreys.numpy(), rtol=1e-12)
    assert rep.symmetric_kl(mp, vp, mp, vp) == pytest.approx(np.zeros(3))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4))
    assert rep.mmd(x, x, 8.0) == 0.0
    assert rep.mmd(x, x[::-1], 8.0) == pytest.approx(0.0, abs=1e-7)
    assert rep.mmd(x, x + 1.0, 8.0) > 0.3 > rep.mmd(x, rng.normal(size=(100, 4)), 8.0)


def test_bn_moments_pool_batches_exactly():
    moments = bn_shift.Moments(1, seed=0)
    xs = [torch.randn(n, 3, 4, 4) * 2 + 5 for n in (5, 7, 1)]
    for x in xs:
        moments.start_batch(len(x))
        moments.add(0, x)
    mean, var = bn_shift.Moments.stats(moments.state()["moments"][0])
    whole = torch.cat(xs).double()
    np.testing.assert_allclose(mean, whole.mean([0, 2, 3]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(var, whole.var([0, 2, 3], unbiased=False).numpy(), rtol=1e-5)
    np.testing.assert_allclose(moments.state()["pooled"][0], whole.mean([2, 3]).numpy(), rtol=1e-5)  # all kept


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # four batches: train b1+b2 site 1, val b3, id_test b1+b2 site 2 (two batches: mixing metrics), test b4
    # (controls: activity); every part in one cache, so nothing here starts Ray
    ds = open_dataset(build_tiny_dataset(tmp_path_factory.mktemp("rep") / "ds", batches=("b1", "b2", "b3", "b4")))
    cache = PartCache(2**30)
    for part in ds.manifest.parts:
        cache.put(part.path, ds.read_part(part))
    return ds, cache


def _evaluator(tiny, method, hparams):
    ds, cache = tiny
    spec = build_specs(ds, "new_batches", method, hparams, [0], "resnet-tiny")[0]
    torch.manual_seed(0)
    instance = get_method(method)(task_spec(ds), spec.hparams, "resnet-tiny")
    return instance, Evaluator(ds, spec, instance, cache=cache)


@pytest.mark.parametrize("method,hparams", [("erm", {}), ("cs-arm-bn", {"batch_size": 4, "eval_n_controls": 3})])
def test_batches_are_the_evaluators(tiny, method, hparams):
    """The analysis embeds exactly the batches the main evaluation predicts on (context controls included)."""
    _, ev = _evaluator(tiny, method, hparams)
    for split in ev.test_splits:
        ours = ev.stream(split, ev.main_batch, ev.main_controls)
        theirs = PlateStream(ev.ds, StreamConfig(scheme="new_batches", split=split,
                                                 shape=BatchShape(ev.main_batch, n_controls=ev.main_controls),
                                                 train=False, keep_ids=True),
                             cache=ev.cache)
        mine = [ours.convert(item) for plate, _ in ours.plan(0)[0]
                for item in rep._plate_items(ours, ev.cache, plate, None)[0]]
        reference = list(theirs.epoch(0))
        assert len(mine) == len(reference) > 0
        for a, b in zip(mine, reference):
            assert a.plate == b.plate and torch.equal(a.images, b.images) and torch.equal(a.is_control, b.is_control)


@pytest.mark.slow  # copairs / scikit-learn / harmonypy: seconds
def test_end_to_end_rows_profiles_and_bn_shift(tiny):
    ds, _ = tiny
    method, ev = _evaluator(tiny, "erm", {})
    result = rep.analyze(method, ev, rep.training_batches(ev), epoch=3, null_size=500)
    table = records_table(result.rows)
    validate(table)  # the extended vocabulary
    assert rep.PROTOCOL in PROTOCOLS and set(rep.METRICS) <= set(METRICS)
    rows = table.to_pylist()
    assert {r["protocol"] for r in rows} == {"representation"} and {r["epoch"] for r in rows} == {3}
    overall = {(r["split"], r["metric"]) for r in rows if r["domain_kind"] == "all"}
    # id_test: site 2 of b1 and b2 (no controls there in this fixture); test: b4 alone (one batch: no mixing);
    # one compound per class in this fixture, so no consistency (positives are other compounds of the class)
    assert overall == {("id_test", m) for m in ("silhouette_batch", "graph_connectivity", "ilisi", "bn_shift_kl",
                                                "bn_shift_mmd")} | \
        {("test", m) for m in ("map_activity", "frac_retrieved", "bn_shift_kl", "bn_shift_mmd")}
    plates = {(r["split"], r["domain"]) for r in rows if r["domain_kind"] == "plate"}
    assert plates == {("id_test", p) for p in ("b1p0", "b1p1", "b2p0", "b2p1")} | {("test", "b4p0"), ("test", "b4p1")}
    assert all(r["eval_batch_size"] == 64 and r["n_controls"] == 0 and r["track"] == "standard" for r in rows)
    assert set(rep.tracking_metrics(result.rows)) == {f"{s}/representation/{m}" for s, m in overall}

    split_rows = {s: ds.split_metadata("new_batches", s) for s in ("id_test", "test")}
    for split, profiles in result.profiles.items():
        meta = split_rows[split]
        assert profiles.n_images == meta.num_rows  # every image of the split, controls included
        assert profiles.meta["n"].sum() == meta.num_rows and len(profiles.features) == len(profiles.meta)
        assert profiles.meta["is_control"].sum() == sum(meta.column("is_control").to_pylist())  # 1 site each
    assert {b["layer"] for b in result.bn_shift} == {n for n, m in method.named_modules()
                                                     if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(b["kl"] >= 0 and b["mmd"] >= 0 for b in result.bn_shift)


@pytest.mark.slow  # copairs / scikit-learn / harmonypy: seconds
def test_tta_control_wells_leave_the_treated_features_as_predicted(tiny):
    """AdaBN (whole-plate statistics): treated wells' profiles are the features of the evaluator's own batches;
    control wells are embedded inside their plate's batch, so they get profiles too."""
    method, ev = _evaluator(tiny, "adabn", {})
    result = rep.analyze(method, ev, None, epoch=1, null_size=500)
    assert not any(r["metric"].startswith("bn_shift") for r in result.rows)  # no reference given
    profiles = result.profiles["test"]
    stream = ev.stream("test", ev.main_batch, ev.main_controls)
    with torch.no_grad():
        for plate, _ in stream.plan(0)[0]:
            (item,), controls = rep._plate_items(stream, ev.cache, plate, None)
            feats = method.embed(stream.convert(item)).numpy()
            table = item.queries.to_pandas()
            for (well, pert), idx in table.groupby(["well", "perturbation"]).groups.items():
                row = profiles.meta.index[(profiles.meta["plate"] == plate) & (profiles.meta["well"] == well)
                                          & (profiles.meta["perturbation"] == pert)]
                np.testing.assert_allclose(profiles.features[row[0]], feats[idx].mean(0), rtol=1e-4, atol=1e-5)
    assert profiles.meta["is_control"].sum() > 0


@pytest.mark.slow  # t-SNE, plots and MLflow
def test_analyze_command_writes_tables_plots_records_and_mlflow_artifacts(tiny, tmp_path, capsys):
    import json

    from mlflow.tracking import MlflowClient
    from platebench.harness.cli import main
    from platebench.harness.results.records import read_records
    from platebench.harness.train.checkpointing import TrainingStore

    ds, _ = tiny
    spec = build_specs(ds, "new_batches", "erm", {}, [0], "resnet-tiny")[0]
    storage, training_id = tmp_path / "store", spec.training().training_id
    torch.manual_seed(0)
    TrainingStore(str(storage), None, training_id).save_weights(
        2, get_method("erm")(task_spec(ds), spec.hparams, "resnet-tiny").state_dict())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow_run = client.create_run(experiment).info.run_id
    (storage / "runs" / spec.run_id).mkdir(parents=True)
    (storage / "runs" / spec.run_id / "spec.json").write_text(json.dumps(spec.to_dict()))
    (storage / "runs" / spec.run_id / "done.json").write_text(json.dumps(
        {"run_id": spec.run_id, "training_id": training_id, "selected_epoch": 2, "mlflow_run_id": mlflow_run}))

    out = tmp_path / "out"
    assert main(["analyze", "--records", str(storage), "--run", spec.run_id, "--out", str(out), "--projection",
                 "tsne", "--write-records", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    printed = capsys.readouterr().out
    # (the fixture has one compound per class, so no consistency row: graph connectivity stands in for a metric)
    assert "| graph_connectivity |" in printed and "logged 6 files to MLflow" in printed
    files = {"representation.csv", "bn_shift.csv", "projection-id_test.png", "projection-test.png",
             "bn-shift-id_test.png", "bn-shift-test.png"}
    assert {p.name for p in out.iterdir()} == files
    assert {a.path.split("/")[-1] for a in client.list_artifacts(mlflow_run, "representation")} == files
    records = read_records(str(storage))
    validate(records)
    assert set(records.column("protocol").to_pylist()) == {"representation"}
    assert set(records.column("epoch").to_pylist()) == {2}

    assert main(["analyze", "--records", str(storage), "--run", "no-such-run"]) == 2  # one line, no traceback
    assert "'no-such-run': no finished run under" in capsys.readouterr().err
