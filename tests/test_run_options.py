"""Run options every method has: early stopping on a validation metric, dataset-level input normalisation."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from platebench.datasets.shards import decode_images, open_dataset
from platebench.harness.cli import main
from platebench.harness.data.channel_stats import channel_stats
from platebench.harness.results.records import read_records
from platebench.harness.train.epochs import should_stop
from platebench.methods import MethodError, get_method
from platebench.methods.base import resolve_hparams
from shard_fixtures import build_tiny_dataset


@pytest.mark.parametrize("values,metric,patience,stop", [
    ([1.0, 0.8, 0.85, 0.9], "loss", 2, True),  # two epochs above the best loss
    ([1.0, 0.8, 0.85, 0.7], "loss", 2, False),  # improved in the last epoch
    ([1.0, 0.8, 0.85], "loss", 3, False),  # not enough epochs yet
    ([0.5, 0.6, 0.6], "accuracy", 1, True),  # an equal accuracy is no improvement
    ([0.5, 0.6, 0.61], "accuracy", 1, False),
])
def test_should_stop_after_patience_epochs_without_improvement(values, metric, patience, stop):
    assert should_stop(values, metric, patience) is stop


def test_run_options_are_checked_against_their_declared_values():
    erm = get_method("erm")
    for key, value, msg in (("early_stop_patience", -1, "must be in [0, inf)"),
                            ("early_stop_metric", "auc", "must be one of loss, accuracy"),
                            ("normalize", "minmax", "must be one of self, dataset"),
                            ("warmup_epochs", 10, "'warmup_epochs' must be below epochs (10)"),
                            ("lr", -5, "'lr' must be in (0, inf)"), ("epochs", 0, "'epochs' must be in [1, inf)")):
        with pytest.raises(MethodError, match=re.escape(msg)):
            resolve_hparams(erm, {key: value})


def test_dataset_channel_statistics_equal_numpy_over_the_training_split(tmp_path):
    ds = open_dataset(build_tiny_dataset(tmp_path / "ds"))
    mean, std = channel_stats(ds, "new_batches", "train")
    expr = ds.split_expression("new_batches", "train")
    images = []
    for plate in ds.manifest.plates_for("new_batches", "train"):
        for part in ds.manifest.parts_of(plate):
            t = ds.read_part(part).filter(expr)
            images.append(decode_images(t.column("image"), ds.manifest.image_shape, ds.manifest.dtype))
    x = np.concatenate(images).astype(np.float64)
    assert np.allclose(mean, x.mean(axis=(0, 2, 3))) and np.allclose(std, x.std(axis=(0, 2, 3)))
    # capped: the first images in manifest order
    few_mean, _ = channel_stats(ds, "new_batches", "train", max_images=5)
    assert np.allclose(few_mean, x[:5].mean(axis=(0, 2, 3)))


@pytest.mark.usefixtures("ray_session")
def test_early_stopping_and_dataset_normalisation_in_a_run(tmp_path):
    """lr ≈ 0: validation accuracy cannot improve for long, so the training stops early; its records end at the
    stopping epoch, which the training's done marker and the stopping rule agree on."""
    ds = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    out = tmp_path / "out"
    assert main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", "erm", "--seeds", "0",
                 "--epochs", "6", "--hparams", "batch_size=8", "lr=1e-12", "early_stop_patience=1",
                 "early_stop_metric=accuracy", "normalize=dataset", "--out", str(out), "--no-mlflow"]) == 0
    (training,) = Path(out, "trainings").iterdir()
    done = json.loads((training / "done.json").read_text())
    assert done["stopped_early"] and done["epochs"] < 6 and done["planned_epochs"] == 6
    monitored = [h["monitor"] for h in done["history"]]
    assert should_stop(monitored, "accuracy", 1)
    assert not any(should_stop(monitored[:k], "accuracy", 1) for k in range(1, len(monitored)))
    records = read_records(str(out)).to_pandas()
    assert records[records.split == "val"].epoch.max() == done["epochs"]
    stats = json.loads((training / "channel_stats.json").read_text())
    assert np.allclose(stats, channel_stats(open_dataset(ds), "new_batches", "train"))
