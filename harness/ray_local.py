"""Start (or join) Ray the way platebench needs it on one host or a cluster.

A local Ray started here listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
Ray 2.60 use the loopback node IP; without it every gRPC server binds all interfaces, ray-research
§6), keeps its temp files under a folder we choose, uses the legacy Parquet datasource (the V2
reader bin-packs files into 128 MiB units and starts 32 footer actors per epoch, §2), and keeps the
dashboard on (Tune + Train need the state API to clean up placement groups of stopped trials, §4).
It is never torn down with `ray stop` (host-wide); `ray.shutdown()` stops what we started.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

# Set before any Ray process starts; workers inherit them from the raylet.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # ray.train.report waits for the controller's poll (default 2 s), and fit() returns only after
    # the next poll: 0.2 s (vs 1 s) cut an empty fit() from 11.3-12.6 s to 8.4-9 s here. A missed poll is not an
    # error (workers are declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), and
    # a shorter poll also narrows the window in which a hard crash loses a just-reported
    # checkpoint (ray-research §3).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Keep idle worker processes for a minute instead of one second: Ray Data read tasks come in
    # bursts (every epoch, every split), and restarting a worker re-imports pyarrow and platebench.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    "RAY_DEDUP_LOGS": "1",
}


def default_tmpdir() -> str:
    # Short path: Ray puts unix sockets under it (107-byte limit).
    try:
        user = getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry in some containers
        user = str(os.getuid())
    return os.environ.get("PLATEBENCH_RAY_TMPDIR") or str(Path(tempfile.gettempdir()) / f"pb-ray-{user}")


def apply_env() -> None:
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_TMPDIR", default_tmpdir())


def init(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
         object_store_mb: int | None = None, log_to_driver: bool = False, include_dashboard: bool = True):
    """Connect to `address` (a cluster, e.g. "auto") or start a loopback-only local Ray. Idempotent."""
    apply_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)
    env_vars = {k: os.environ[k] for k in RAY_ENV}
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                "PLATEBENCH_S3_ENDPOINT", "PLATEBENCH_S3_ANON", "PLATEBENCH_S3_REGION"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    runtime_env = {"env_vars": env_vars}
    if address:
        return ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver,
                        ignore_reinit_error=True)
    tmp = os.environ["RAY_TMPDIR"]
    os.makedirs(tmp, exist_ok=True)
    kw = {}
    if object_store_mb:
        kw["object_store_memory"] = object_store_mb * 2**20
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                    dashboard_host="127.0.0.1", _temp_dir=tmp, log_to_driver=log_to_driver,
                    runtime_env=runtime_env, ignore_reinit_error=True, configure_logging=True,
                    logging_level="warning", **kw)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
