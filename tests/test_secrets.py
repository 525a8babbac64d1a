"""No credential is written anywhere: not in Ray's runtime_env or session folder (logs included), not in storage,
the output folder or MLflow. Workers read credentials from their own environment (or an instance role)."""

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from ray_procs import kill_ray_under
from shard_fixtures import build_tiny_dataset

# Distinctive values: a hit can only be a copy of them.
SECRET = "pbSentinelSecret" + uuid.uuid4().hex
KEY_ID = "PBSENTINELKEYID" + uuid.uuid4().hex[:12].upper()


def _hits(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_symlink() or not path.is_file():
                continue  # unix sockets, fifos: nothing written in them persists
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path} holds {n.decode()[:16]}..." for n in needles if n in data]
    return found


def test_runtime_env_carries_only_non_secret_settings(monkeypatch):
    """What platebench hands Ray's runtime_env (logged in plain text by Ray's runtime-env agent)."""
    from platebench.harness import ray_local

    for name, value in {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SESSION_TOKEN": SECRET,
                        "MLFLOW_TRACKING_PASSWORD": SECRET, "PLATEBENCH_S3_ENDPOINT": "http://127.0.0.1:9",
                        "PLATEBENCH_S3_REGION": "eu-west-1", "PLATEBENCH_STORAGE_RETRY_S": "300"}.items():
        monkeypatch.setenv(name, value)
    env = ray_local.runtime_env_vars()
    assert SECRET not in repr(env) and KEY_ID not in repr(env)
    assert env["PLATEBENCH_S3_ENDPOINT"] == "http://127.0.0.1:9" and env["PLATEBENCH_S3_REGION"] == "eu-west-1"
    assert env["PLATEBENCH_STORAGE_RETRY_S"] == "300"  # workers wait out a storage outage as long as the driver
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_tune_does_not_copy_credentials_into_trials():
    from platebench.harness import ray_local
    from ray.tune.execution import class_cache

    ray_local._keep_credentials_out_of_tune()  # what ray_local.init does
    assert not set(ray_local.CREDENTIAL_ENV) & class_cache.ENV_VARS_TO_PROPAGATE


def test_storage_options_never_write_credentials():
    import json

    from platebench.datasets.storage import StorageOptions

    opts = StorageOptions(endpoint_url="http://127.0.0.1:9", key=KEY_ID, secret=SECRET)
    assert SECRET not in repr(opts) and KEY_ID not in repr(opts)
    assert SECRET not in json.dumps(opts.to_dict()) and KEY_ID not in json.dumps(opts.to_dict())
    assert opts.s3fs_kwargs()["secret"] == SECRET  # still usable in memory, where the filesystem is built


@pytest.mark.ray  # a `platebench sweep` subprocess starts its own Ray, on its own moto server
@pytest.mark.s3
@pytest.mark.slow
def test_sweep_writes_no_credential_anywhere(tmp_path, s3_server):
    """A sweep on S3 with sentinel AWS credentials in its environment: they appear in no file of Ray's session
    folder (logs included), of the output folder (MLflow store included) or of the bucket."""
    import boto3

    s3_server.create_bucket("pb-secrets")
    data = build_tiny_dataset("s3://pb-secrets/ds", images_per_plate=16, options=s3_server.options())
    ray_tmp = tempfile.mkdtemp(prefix="pbs", dir="/tmp")  # short: Ray puts unix sockets under it
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PLATEBENCH_RAY_TMPDIR": ray_tmp,
           "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "platebench.harness.cli", "sweep", "--data", data, "--split-scheme", "new_batches",
           "--method", "erm", "--trials", "1", "--epochs", "1", "--hparams", "batch_size=8", "--search", "random",
           "--scheduler", "none", "--max-concurrent", "1", "--num-cpus", "3", "--storage", "s3://pb-secrets/runs",
           "--out", str(out)]
    try:
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
        finally:
            kill_ray_under(ray_tmp)
        tail = f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, f"sweep failed (rc {proc.returncode}):\n{tail}"
        assert SECRET not in proc.stdout + proc.stderr and KEY_ID not in proc.stdout + proc.stderr
        assert list(Path(ray_tmp).glob("session_*/logs/*.log")), f"no Ray session logs under {ray_tmp}"
        with sqlite3.connect(out / "mlflow.db") as db:  # the trial's run and metrics did reach MLflow
            assert db.execute("select count(*) from metrics").fetchone()[0] > 0
        needles = [SECRET.encode(), KEY_ID.encode()]
        hits = _hits(Path(ray_tmp), needles) + _hits(out, needles)
        s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="pb-secrets")
                for o in page.get("Contents", [])]
        assert any(k.startswith("runs/") and k.endswith("done.json") for k in keys), "no done marker in the bucket"
        for key in keys:
            body = s3.get_object(Bucket="pb-secrets", Key=key)["Body"].read()
            hits += [f"s3://pb-secrets/{key} holds a credential" for n in needles if n in body]
        assert not hits, "credentials written to disk:\n" + "\n".join(hits[:20])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
