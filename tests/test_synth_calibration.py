"""Calibration of the `quickstart` preset, seen through the harness: the proof that the default benchmark
measures something.

For two data seeds, the default suite's `erm` and `adabn` (which share one training per seed) are run by
`platebench bench` (stream, methods, evaluation, records, leaderboard) with the suite's own epochs and
hyperparameters on 3 training seeds (the suite runs 5; 3 keep CI short and the intervals still clear 0).
On each data seed's leaderboard:
  * ERM learns the task: id_test (the training plates' other site) accuracy >= 70%;
  * batch effects matter: ERM loses >= 10 points from id_test to the held-out batches (test). Training
    seeds move a method's accuracy by a few points, so a benchmark needs a gap several times larger for
    corrections to be measurable;
  * per-plate normalisation helps, measurably: AdaBN's gain over ERM on test has a 95% interval above 0.
    AdaBN and ERM share the weights, so the paired difference isolates test-time adaptation exactly.
About 4 minutes per data seed on 2 cores, so it runs on request, not in the default `pytest -q` (CI's budget):
`pytest -m calibration -rP` checks data seed 0 and prints the figures; `PLATEBENCH_CALIBRATION_SEEDS="0 1"` checks
both (the figures in docs/datasets.md).
"""

from __future__ import annotations

import json
import os

import pytest
from platebench.harness.cli import main

DATA_SEEDS = [int(s) for s in os.environ.get("PLATEBENCH_CALIBRATION_SEEDS", "0").split()]


@pytest.mark.calibration  # minutes: 3 training seeds per data seed on the quickstart preset
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("data_seed", DATA_SEEDS)
def test_quickstart_batch_effects_hurt_erm_and_adabn_recovers_measurably(tmp_path, data_seed):
    data = tmp_path / "data"
    assert main(["synth", "--preset", "quickstart", "--data", str(data), "--seed", str(data_seed)]) == 0
    out = tmp_path / "out"
    assert main(["bench", "--data", str(data), "--methods", "erm", "adabn", "--seeds", "0", "1", "2",
                 "--out", str(out), "--no-mlflow"]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {(t["split"], t["track"], r["method"]): r for t in board["tables"] for r in t["rows"]}
    erm_id, erm_ood = rows[("id_test", "standard", "erm")], rows[("test", "standard", "erm")]
    adabn = rows[("test", "tta", "adabn")]
    figures = {"erm_id": erm_id["mean"], "erm_test": erm_ood["mean"], "adabn_test": adabn["mean"],
               "adabn_gain_ci": adabn["diff_ci95"]}
    print(f"data seed {data_seed}:", json.dumps(figures))  # shown by `pytest -rP` (the README's table)
    assert erm_id["mean"] >= 0.70, figures
    assert erm_id["mean"] - erm_ood["mean"] >= 0.10, figures
    assert adabn["diff_ci95"][0] > 0, figures
