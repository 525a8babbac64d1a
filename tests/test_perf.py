"""The perf commands' figures: each ratio is the quotient it claims to be, over a complete measurement."""

import json

import pytest
from platebench.datasets.shards import open_dataset
from platebench.harness.cli import build_parser
from platebench.harness.perf import data, train, tune
from platebench.harness.perf.common import emit


def _emitted(name: str, figures: dict, path) -> dict:
    emit(name, figures, str(path))
    out = json.loads(path.read_text())
    assert all(not isinstance(v, (dict, list)) for v in out.values()), "perf JSON must be flat"
    return out


def test_perf_tune_needs_no_dataset_argument():
    args = build_parser().parse_args(["perf", "tune", "--json", "t.json"])
    assert args.data is None and args.trials == 3 and args.epochs is None


@pytest.mark.usefixtures("ray_session")
def test_perf_data_streams_every_image_once(tiny_dataset, tmp_path):
    ds = open_dataset(str(tiny_dataset))
    out = _emitted("data", data.run(ds, batch_size=8, parallelism=2), tmp_path / "d.json")
    # Labelled rows only: controls are context, never classified.
    assert out["images"] == sum(p.rows - p.controls for p in ds.manifest.parts) > 0
    assert out["ratio"] == pytest.approx(out["stream_images_per_s"] / out["pyarrow_images_per_s"])


@pytest.mark.usefixtures("ray_session")
def test_perf_train_ratio_is_ray_step_over_plain_step(tmp_path):
    figures = train.run(image_size=16, batch_size=8, steps=3, warmup=1, storage=str(tmp_path / "st"), scaling=False)
    out = _emitted("train", figures, tmp_path / "t.json")
    assert out["ratio"] == pytest.approx(out["ray_train_step_s"] / out["plain_step_s"])
    # A fit() starts a controller and a worker process: never free, whatever the step time.
    assert out["fit_fixed_cost_s"] > 1.0


@pytest.mark.usefixtures("ray_session")
def test_perf_tune_ratio_is_overhead_over_training(tiny_dataset, tmp_path):
    figures = tune.run(str(tiny_dataset), trials=1, epochs=1, hparams={"batch_size": 8}, storage=str(tmp_path / "st"))
    out = _emitted("tune", figures, tmp_path / "u.json")
    assert out["trials"] == 1 and out["epochs"] == 1
    assert out["ratio"] == pytest.approx(out["overhead_per_trial_s"] / out["training_per_trial_s"])
    assert out["trial_wall_s"] == pytest.approx(out["overhead_per_trial_s"] + out["training_per_trial_s"])
    assert out["overhead_per_trial_s"] > 1.0 and out["training_per_trial_s"] > 0
