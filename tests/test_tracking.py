"""MLflow writes from the background tracker: runs found again after a restart, replayed epochs logged once."""

import pytest
from platebench.harness.train import tracking


@pytest.mark.slow  # an MLflow store
def test_a_restarted_worker_reopens_its_runs_and_logs_a_replayed_epoch_once(tmp_path):
    uri = tracking.default_uri(tmp_path)
    exp = tracking.open_experiment(uri, "t")
    parent = tracking.start_parent(uri, exp, "bench", {})
    target = tracking.MlflowTarget(uri, exp, parent)

    first = tracking.BackgroundTracker(target)
    first.open("train-1", "train erm seed 0", "training", {"lr": 0.1})
    first.open("run-1", "erm seed 0", "seed", {"lr": 0.1}, parent_key="train-1")
    for epoch in (1, 2):
        first.log_metrics("run-1", {"val/accuracy": 0.1 * epoch}, epoch, "val")
    first.flush()
    # the worker dies after logging epoch 2 but before its checkpoint: the new worker replays epoch 2
    second = tracking.BackgroundTracker(target)
    second.open("train-1", "train erm seed 0", "training", {"lr": 0.1})
    second.open("run-1", "erm seed 0", "seed", {"lr": 0.1}, parent_key="train-1")
    for epoch in (2, 3):
        second.log_metrics("run-1", {"val/accuracy": 0.1 * epoch}, epoch, "val")
    second.log_metrics("run-1", {"test/accuracy": 0.5}, 2, "tests")  # another phase at the same epoch
    second.close("run-1")
    second.flush()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([exp])
    assert second.run_ids["run-1"] == first.run_ids["run-1"]  # found again, not created twice
    assert len([r for r in runs if r.data.tags.get("platebench.kind") == "seed"]) == 1
    history = client.get_metric_history(first.run_ids["run-1"], "val/accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(first.run_ids["run-1"], "test/accuracy")] == [2]
    training = client.get_run(first.run_ids["train-1"])
    assert training.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(first.run_ids["run-1"]).data.tags["mlflow.parentRunId"] == first.run_ids["train-1"]
    assert not first.gaps and not second.gaps


@pytest.mark.slow  # the MLflow client
def test_an_unreachable_server_is_a_gap_never_an_error():
    target = tracking.MlflowTarget("http://127.0.0.1:9", "0", None)  # nothing listens on the discard port
    tracker = tracking.BackgroundTracker(target, flush_timeout=60)
    tracker.open("run-1", "erm", "seed", {})
    tracker.log_metrics("run-1", {"val/accuracy": 0.5}, 1, "val")
    tracker.flush()
    assert tracker.gaps["run-1"] and "open" in tracker.gaps["run-1"][0]
