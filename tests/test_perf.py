"""The perf commands' baselines do the same work as what they are compared with, and their output is as documented.

No timing is asserted: on a shared box any rate can come out either way. What can be checked is that each
baseline reads the same parts and delivers the same batches (so a ratio compares like with like), that
the plain training loop trains the same model as a run, and that the JSON and errors are as documented.
"""

import json
from dataclasses import replace

import pyarrow.compute as pc
import pytest
import torch
from platebench.datasets.shards import open_dataset
from platebench.harness.cli import build_parser, main
from platebench.harness.data.stream import PlateStream, StreamConfig
from platebench.harness.perf import data, ingest, train, tune
from platebench.harness.perf.common import MACHINE_KEYS, emit
from platebench.harness.perf.plain import PlainPlateStream, close_loader, plate_loader
from platebench.harness.train.runspec import check_trainable
from platebench.methods.base import BatchShape


def _emitted(name: str, figures: dict, keys, path) -> dict:
    emit(name, figures, str(path), keys)
    return json.loads(path.read_text())


def _same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        x, y = (x if isinstance(x, list) else [x]), (y if isinstance(y, list) else [y])
        assert [i.plate for i in x] == [i.plate for i in y]
        assert [list(i.image_ids) for i in x] == [list(i.image_ids) for i in y]
        assert all(torch.equal(i.images, j.images) and torch.equal(i.labels, j.labels) for i, j in zip(x, y))


def test_perf_tune_needs_no_dataset_argument():
    args = build_parser().parse_args(["perf", "tune", "--json", "t.json"])
    assert args.data is None and args.trials == 3 and args.epochs is None


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_plain_stream_delivers_the_ray_streams_batches(tiny_dataset, mode):
    """Same parts, same Rebatcher, same conversion: only the reader differs, so the batches are identical
    (including the seeded shuffle, the controls and the augmentation of a training epoch)."""
    ds = open_dataset(str(tiny_dataset))
    cfg = {"eval": StreamConfig(scheme=None, split=None, shape=BatchShape(5), train=False, keep_ids=True),
           "train": StreamConfig(scheme="new_batches", split="train", shape=BatchShape(3, n_controls=2), train=True,
                                 seed=3, augment="flip-rot90", keep_ids=True),
           "mixed": StreamConfig(scheme="new_batches", split="val", shape=BatchShape(4, plate_pure=False), train=True,
                                 seed=1, keep_ids=True)}[mode]
    ray_batches = list(PlateStream(ds, cfg).epoch(1))
    plain_batches = list(PlainPlateStream(ds, cfg, read_threads=2).epoch(1))
    _same_batches(ray_batches, plain_batches)


@pytest.mark.slow  # DataLoader worker processes
def test_dataloader_baseline_yields_the_streams_plate_pure_batches(tiny_dataset):
    ds = open_dataset(str(tiny_dataset))
    cfg = replace(data.stream_config(ds, batch_size=5, parallelism=2, limit_parts=None), keep_ids=True)
    expected = [batch for batch, _ in PlainPlateStream(ds, cfg).host_epoch(0)]  # the loader serves host batches
    loader, _ = plate_loader(PlainPlateStream(ds, cfg), workers=2)
    try:
        per_plate = list(loader)
    finally:
        close_loader(loader)
    assert len(per_plate) == len(ds.manifest.plates)
    for plate_batches in per_plate:
        assert len({b.plate for b in plate_batches}) == 1
        for b in plate_batches:
            assert set(b.domains["plate"].tolist()) == {b.domains["plate"][0].item()}
            assert all(i.startswith(b.plate) for i in b.image_ids)  # the fixture's ids start with the plate
    _same_batches(expected, [b for plate_batches in per_plate for b in plate_batches])


def test_physical_limit_converts_every_labelled_image_of_the_same_parts(tiny_dataset):
    ds = open_dataset(str(tiny_dataset))
    cfg = data.stream_config(ds, batch_size=5, parallelism=2, limit_parts=2)
    plates = set(cfg.plates)
    labelled = ds.metadata(list(plates)).filter(pc.field("label") >= 0).num_rows
    assert len(plates) < len(ds.manifest.plates)  # --limit-parts narrows every path alike
    assert data.limit_rate(ds, cfg)["images"] == labelled > 0
    # the limit on several cores: its shares are disjoint and cover every part
    assert sum(data.limit_rate(ds, cfg, (i, 3))["images"] for i in range(3)) == labelled


PART_STEPS = ("read", "checksum", "object_store")


@pytest.mark.usefixtures("ray_session")
def test_perf_data_json_is_flat_with_the_documented_keys(tiny_dataset, tmp_path):
    path = tmp_path / "d.json"
    assert main(["perf", "data", "--data", str(tiny_dataset), "--batch-size", "8", "--repeats", "1",
                 "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert set(out) == set(data.KEYS) | set(MACHINE_KEYS)
    assert all(not isinstance(v, (dict, list)) for v in out.values())
    ds = open_dataset(str(tiny_dataset))
    assert out["images"] == sum(p.rows - p.controls for p in ds.manifest.parts)  # labelled rows, once each
    assert out["plates"] == len(ds.manifest.plates) and out["stream_cores"] >= 1
    # busy CPU time is the whole machine's: a path can use at most every core for its wall time
    for path in ("stream", "pyarrow"):
        assert 0 < out[f"{path}_busy_fraction"] <= 1.0 and out[f"{path}_cpu_ms_per_image"] > 0
    assert out["limit_core_scaling"] > 0 and min(out[f"part_{step}_ms"] for step in PART_STEPS) > 0
    assert out["part_mb"] == pytest.approx(max(p.rows for p in ds.manifest.parts) * ds.manifest.image_nbytes / 2**20,
                                           rel=0.5)  # a decoded part: its images and a few metadata columns


@pytest.mark.usefixtures("ray_session")
def test_perf_train_plain_loop_trains_and_evaluates_what_the_run_does(tiny_dataset, tmp_path):
    spec = train.prepare(str(tiny_dataset), hparams={"batch_size": 8})
    out = _emitted("train", train.run(spec, storage=str(tmp_path / "st")), train.KEYS, tmp_path / "t.json")
    ds = open_dataset(str(tiny_dataset))
    assert spec.hparams["epochs"] == 1
    assert out["steps"] == check_trainable(ds, spec, 1)
    # Batches of 8 divide each training plate's 8 labelled images: every one is trained on once.
    assert out["train_images"] == ds.split_metadata("new_batches", "train").filter(pc.field("label") >= 0).num_rows
    evaluated = sum(ds.split_metadata("new_batches", s).filter(pc.field("label") >= 0).num_rows
                    for s in ("val", "id_test", "test"))
    assert out["eval_images"] == evaluated
    # Same seed, initial weights, batches, schedule and threads: the same model (the loss moves with any
    # change, e.g. a 1% different learning rate).
    assert out["plain_val_accuracy"] == pytest.approx(out["ray_val_accuracy"], abs=1e-9)
    assert out["plain_val_loss"] == pytest.approx(out["ray_val_loss"], rel=1e-6)
    assert (tmp_path / "st" / "repeat-0" / "runs" / spec.run_id / "done.json").exists()
    # The device-side preparation is a part of the training step's time, never all of it.
    per_step = out["plain_training_s"] / out["train_images"]
    assert 0 < out["prep_s_per_image"] < per_step


@pytest.mark.usefixtures("ray_session")
def test_perf_tune_measures_the_trials_it_ran(tiny_dataset, tmp_path):
    figures = tune.run(str(tiny_dataset), trials=1, epochs=1, hparams={"batch_size": 8}, storage=str(tmp_path / "st"))
    out = _emitted("tune", figures, tune.KEYS, tmp_path / "u.json")
    assert out["trials"] == 1 and out["epochs"] == 1
    # A trial's fit() starts a controller and a worker process: its overhead is never free.
    assert out["overhead_per_trial_s"] > 1.0 and out["training_per_trial_s"] > 0


@pytest.mark.usefixtures("ray_session")
def test_perf_ingest_pool_writes_the_same_shards_as_the_ray_jobs(tmp_path):
    out = _emitted("ingest", ingest.run(experiments=3, size=8, wells=4, parallelism=2, work=str(tmp_path)),
                   ingest.KEYS, tmp_path / "i.json")
    assert out["images"] == 3 * 4 * 4 * 2 and out["plates"] == 12 and out["workers"] == 2
    manifests = [open_dataset(str(tmp_path / name)).manifest for name in ("pool", "ray-1", "ray-2")]
    assert len({tuple((p.path, p.sha256) for p in m.parts) for m in manifests}) == 1
    assert len({m.checksum() for m in manifests}) == 1


def test_emit_refuses_nested_or_undocumented_figures(tmp_path):
    with pytest.raises(ValueError, match="flat"):
        emit("x", {"ratio": 1.0, "per_plate": {"a": 1}}, None)
    with pytest.raises(ValueError, match=r"missing \['b'\], undocumented \['c'\]"):
        emit("x", {"ratio": 1.0, "c": 2}, None, keys=("ratio", "b"))
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["perf", "data", "--data", "{tiny}", "--parallelism", "0"], "argument --parallelism: must be >= 1, got 0"),
    (["perf", "data", "--data", "{missing}"], "not found"),
    (["perf", "train", "--data", "{tiny}", "--method", "no-such-method"], "no-such-method"),
    (["perf", "train", "--data", "{tiny}", "--hparams", "no_such_hparam=1"], "no_such_hparam"),
    (["perf", "train", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["perf", "tune", "--data", "{missing}"], "not found"),
    (["perf", "ingest", "--experiments", "2"], "--experiments must be at least 3"),
])
def test_perf_bad_argument_exits_2_with_one_line(tiny_dataset, tmp_path, capsys, argv, message):
    argv = [a.format(tiny=tiny_dataset, missing=tmp_path / "missing") for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exit_:  # a flag of the wrong type or range: argparse's own one line
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage line first
    assert err.startswith("platebench perf") and "error:" in err and message in err
