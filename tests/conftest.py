"""Shared fixtures: one local Ray per test session, a moto S3 server on 127.0.0.1, tiny datasets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from platebench.harness import ray_local
from platebench.methods.distributed import free_port

ray_local.apply_env()

# Test tiers (markers registered in pyproject.toml). A test is `ray` when it needs the session Ray, `s3` when it needs
# the moto server, `browser` when it drives Chromium; modules that start Ray, servers or CLI subprocesses without those
# fixtures say so with `pytestmark`, and slow pure tests carry `slow`. Whatever is none of these is `unit`: the fast
# tier, `pytest -m unit`.
TIER_FIXTURES = {"ray": {"ray_session"}, "s3": {"s3_server", "s3_env"}}
NOT_UNIT = ("ray", "s3", "browser", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(item.fixturenames)
        for marker, fixtures in TIER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)
        if not any(item.get_closest_marker(name) for name in NOT_UNIT):
            item.add_marker("unit")


@pytest.fixture(autouse=True)
def _ray_only_through_ray_session(request):
    """One Ray per session, started by `ray_session` with its settings: a test that starts Ray without that fixture
    (through `main(["run", ...])`, say) would give every later test a Ray with other CPUs, and in the unit tier would
    cost seconds. Fail it, saying so."""
    ray = sys.modules.get("ray")
    was_up = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not was_up and "ray_session" not in request.fixturenames and ray is not None and ray.is_initialized():
        pytest.fail("this test started Ray: request the ray_session fixture", pytrace=False)


@pytest.fixture(scope="session")
def ray_session():
    """A loopback-only local Ray shared by the whole session (started on first use).

    4 logical CPUs on a 2-core box: Ray Data read tasks need CPUs beside the Train workers
    (without spare CPUs the stream's read tasks never run), and Tune trials reserve one CPU each.
    """
    import ray

    ray_local.init(num_cpus=4, object_store_mb=768)
    yield ray
    ray_local.shutdown()



class S3Server:
    """A moto_server subprocess bound to 127.0.0.1; `stop()`/`start()` simulate an outage."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        # moto with the one answer pyarrow's S3 writer needs fixed (Ray Train's storage writes through pyarrow).
        script = Path(__file__).with_name("moto_s3_server.py")
        self.proc = subprocess.Popen([sys.executable, str(script), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def options(self, **kw):
        from platebench.datasets.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint, key="testing", secret="testing", region="us-east-1", **kw)

    def create_bucket(self, name: str, public: bool = False):
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        kw = {"ACL": "public-read"} if public else {}
        s3.create_bucket(Bucket=name, **kw)
        return s3


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point every S3 client in this process at the moto server through the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small random dataset in the shard format (6 plates, 2 sources, controls on every plate)."""
    from shard_fixtures import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    # `main([... "--s3-endpoint", URL])` in-process sets these for the process (as the CLI must, for its Ray
    # workers); a later test's subprocess would inherit a dead endpoint. Each test starts from the session's.
    for key in ("PLATEBENCH_S3_ENDPOINT", "PLATEBENCH_S3_ANON", "PLATEBENCH_S3_REGION"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test's own torch work on one thread: on a 2-core box more threads spin against each other (a style
    method's tests took 17 s of CPU with two threads, 2.4 s with one). Ray and DataLoader workers set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
