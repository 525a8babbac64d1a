"""The MLflow URI handed to Train workers and Tune trials is one every node reaches (tracking.worker_tracking_uri)."""

from types import SimpleNamespace

import pytest
from platebench.harness.errors import HarnessError
from platebench.harness.train.tracking import worker_tracking_uri

HEAD = "10.0.3.7"  # the driver node's cluster address: not loopback


@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:5000", f"http://{HEAD}:5000"),
    ("http://localhost:5000/mlflow", f"http://{HEAD}:5000/mlflow"),
    ("https://127.0.0.2", f"https://{HEAD}"),
    ("http://tracker@[::1]:5000", f"http://tracker@{HEAD}:5000"),
    ("http://10.0.3.9:5000", "http://10.0.3.9:5000"),  # already reachable: unchanged
    ("https://mlflow.example.org", "https://mlflow.example.org"),
    ("databricks", "databricks"),
])
def test_a_loopback_uri_on_a_cluster_becomes_the_driver_nodes_address(uri, expected):
    assert worker_tracking_uri(uri, HEAD, nodes=3) == expected
    assert worker_tracking_uri(uri, HEAD, nodes=1, cluster=True) == expected  # joined with --address


def test_an_ipv6_driver_address_is_bracketed():
    assert worker_tracking_uri("http://127.0.0.1:5000", "fd00::5", nodes=2) == "http://[fd00::5]:5000"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "sqlite:////tmp/out/mlflow.db", "/tmp/out/mlruns"])
def test_one_machine_changes_nothing(uri):
    assert worker_tracking_uri(uri, None, nodes=1) == uri  # the local Ray
    assert worker_tracking_uri(uri, "127.0.0.1", nodes=2, cluster=True) == uri  # every node on this machine


@pytest.mark.parametrize("uri", ["sqlite:////tmp/out/mlflow.db", "file:///tmp/mlruns", "/tmp/out/mlruns"])
def test_a_file_store_on_a_cluster_is_refused_with_the_fix(uri):
    with pytest.raises(HarnessError, match=r"other nodes cannot reach; use --mlflow-uri http://<head-ip>:5000"):
        worker_tracking_uri(uri, HEAD, nodes=2)


def test_a_loopback_uri_without_the_driver_address_is_refused():
    with pytest.raises(HarnessError, match=r"address is unknown; use --mlflow-uri http://<head-ip>:5000"):
        worker_tracking_uri("http://127.0.0.1:5000", None, nodes=2)


def test_a_password_in_the_uri_is_refused_everywhere():
    for driver, nodes in ((None, 1), (HEAD, 2)):
        with pytest.raises(HarnessError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
            worker_tracking_uri("http://admin:hunter2@127.0.0.1:5000", driver, nodes)


def test_open_tracking_resolves_against_the_joined_clusters_driver_node(monkeypatch):
    """The wiring: with --address, the driver node is the one this process runs on, among the alive nodes."""
    import ray
    from platebench.harness.commands import session

    nodes = [{"NodeID": "w1", "Alive": True, "NodeManagerAddress": "10.0.3.8"},
             {"NodeID": "head", "Alive": True, "NodeManagerAddress": HEAD},
             {"NodeID": "gone", "Alive": False, "NodeManagerAddress": "10.0.3.9"}]
    monkeypatch.setattr(session, "start_ray", lambda args: None)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "head"))
    args = SimpleNamespace(address="auto")
    assert session.tracking_uri_for_workers(args, "http://127.0.0.1:5000") == f"http://{HEAD}:5000"
    with pytest.raises(HarnessError, match="--mlflow-uri http://<head-ip>:5000"):
        session.tracking_uri_for_workers(args, "sqlite:////tmp/out/mlflow.db")
