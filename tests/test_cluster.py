"""Multi-node on one machine: Train workers across nodes give the same metrics; a run on the second node logs to
the driver's MLflow server; sweep trials spread."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray_procs import kill_ray_under
from shard_fixtures import build_tiny_dataset

# A two-node Ray cluster in a subprocess, about 3 minutes on 2 cores: on request (pytest -m cluster), not in CI's run.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]

def test_two_node_cluster_runs_and_sweeps(tmp_path):
    data = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    ray_tmp = tempfile.mkdtemp(prefix="pbc", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PLATEBENCH_RAY_TMPDIR": ray_tmp}
    script = Path(__file__).with_name("cluster_scenario.py")
    try:
        proc = subprocess.run([sys.executable, str(script), data, str(tmp_path / "work")], env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        kill_ray_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"scenario failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["nodes"] == 2
    spread = {p["node_id"] for p in out["spread_placement"]}
    pack = {p["node_id"] for p in out["pack_placement"]}
    assert len(spread) == 2, "STRICT_SPREAD must put the two workers on different nodes"
    assert len(pack) == 1
    assert out["spread_records"] == out["pack_records"]  # same seed: same metrics across nodes
    # every node on 127.0.0.1: the loopback URI is left as given, and it is the driver's server for every node
    assert out["mlflow_uri"] == out["mlflow_uri_given"]
    assert out["mlflow_rank0_node"] == out["second_node"], "the MLflow run must be logged from the second node"
    assert not out["mlflow_gaps"], f"MLflow gaps: {out['mlflow_gaps']}"
    seed_runs = out["mlflow_seed_runs"]
    assert [(r["kind"], r["status"]) for r in seed_runs] == [("seed", "FINISHED")], seed_runs
    assert any(m.startswith("val/") for m in seed_runs[0]["metrics"]), seed_runs[0]["metrics"]
    assert not out["sweep_errors"]
    assert len(set(out["sweep_trial_nodes"])) == 2, "two concurrent 2-CPU trials can only run on different nodes"
