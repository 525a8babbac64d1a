"""Start (or join) Ray the way platebench needs it on one host or a cluster.

A local Ray started here listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
Ray 2.60 use the loopback node IP; without it every gRPC server binds all interfaces), keeps its temp
files under a folder we choose, uses the legacy Parquet datasource (the V2 reader bin-packs files into
128 MiB units and starts 32 footer actors per epoch), and keeps the dashboard on (Tune + Train need the
state API to clean up placement groups of stopped trials).
It is never torn down with `ray stop` (host-wide); `ray.shutdown()` stops what we started.
Train workers rendezvous through a store listening on rank 0's node address only (torch_config), and
no credential is put in a runtime_env (Ray logs it): workers read theirs from their own environment.
"""

from __future__ import annotations

import getpass
import math
import os
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from platebench.datasets.storage import RETRY_WINDOW_ENV

from .errors import HarnessError

# Set before any Ray process starts; workers inherit them from the raylet.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # ray.train.report waits for the controller's poll (default 2 s), and fit() returns only after
    # the next poll: 0.2 s (vs 1 s) cut an empty fit() from 11.3-12.6 s to 8.4-9 s here. A missed poll is not an
    # error (workers are declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), and
    # a shorter poll also narrows the window in which a hard crash loses a just-reported
    # checkpoint.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Keep idle worker processes for a minute instead of one second: Ray Data read tasks come in
    # bursts (every epoch, every split), and restarting a worker re-imports pyarrow and platebench.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    "RAY_DEDUP_LOGS": "1",
}


# Non-secret settings a Ray started or joined here hands its workers through runtime_env, besides RAY_ENV. Never
# credentials: Ray's runtime-env agent writes this environment in plain text to the session's logs. Workers read
# credentials from their own environment (a local Ray's workers inherit the driver's) or an instance role.
# The storage retry window too: workers write checkpoints and records, and wait out an outage as long as the driver.
RUNTIME_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "PLATEBENCH_S3_ENDPOINT", "PLATEBENCH_S3_ANON",
                    "PLATEBENCH_S3_REGION", RETRY_WINDOW_ENV)


# Credentials Ray Tune would copy from the driver's environment into every trial's runtime_env.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


# The longest a local Ray may take to start, in seconds (Ray's own waits are 30 s each, some fixed).
START_WAIT_ENV = "PLATEBENCH_RAY_START_WAIT_S"
DEFAULT_START_WAIT_S = 120.0


def start_wait_s() -> float:
    """The start-up wait of a local Ray: $PLATEBENCH_RAY_START_WAIT_S, else DEFAULT_START_WAIT_S."""
    from platebench.datasets.storage import env_seconds

    return env_seconds(START_WAIT_ENV, DEFAULT_START_WAIT_S, HarnessError)


def runtime_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env platebench gives Ray: RAY_ENV and RUNTIME_ENV_KEYS that are set."""
    return {k: os.environ[k] for k in (*RAY_ENV, *RUNTIME_ENV_KEYS) if k in os.environ}


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
        if address:  # a process already connected (the API used in-process): --address must still answer
            check_reachable(address)
        return ray.get_runtime_context()
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)
    _keep_credentials_out_of_tune()
    runtime_env = {"env_vars": runtime_env_vars()}
    if address:
        check_reachable(address)
        _resolve_loopback_as_loopback(address)
        try:
            return ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver,
                            ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise HarnessError(f"cannot join the Ray cluster at --address {address} "
                               f"({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})") from None
    wait_s = start_wait_s()
    tmp = os.environ["RAY_TMPDIR"]
    os.makedirs(tmp, exist_ok=True)
    kw = {}
    if object_store_mb:
        kw["object_store_memory"] = object_store_mb * 2**20
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when first imported, and a platebench module may have
    # imported it before apply_env ran: the node IP would then be the host's and Ray's servers would listen on
    # every interface. The processes started below read it from the environment set above.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray warns on every local start that it turned token authentication on (its default, kept): noise in a
    # command's output, and a second stderr line beside a start-up error.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if include_dashboard:
        # Ray imports the dashboard's dependencies inside the start; an import cut short by the start-wait timer
        # reads as "dashboard dependencies failed to install" (six lines from Ray's logger). Imported here, outside
        # the timer; a real failure is left to Ray to report.
        with suppress(ImportError):
            import ray.dashboard.optional_deps  # noqa: F401
    started = time.monotonic()
    try:
        with _start_wait(wait_s):
            return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                            dashboard_host="127.0.0.1", _temp_dir=tmp, log_to_driver=log_to_driver,
                            runtime_env=runtime_env, ignore_reinit_error=True, configure_logging=True,
                            logging_level="warning", **kw)
    except BaseException as exc:  # Ctrl-C too: what was started is stopped either way
        _stop_half_started(exc)
        if not isinstance(exc, Exception):
            raise
        why = "" if isinstance(exc, _StartWaitOver) else f": {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        raise HarnessError(
            f"the local Ray did not start within {time.monotonic() - started:.0f} s (the wait is {wait_s:g} s){why}; "
            f"on a busy machine wait longer ({START_WAIT_ENV}={2 * wait_s:g}), start fewer CPUs (--num-cpus N) or "
            f"join a running Ray (--address HOST:PORT); Ray's logs: {tmp}/session_latest/logs") from None


class _StartWaitOver(TimeoutError):
    """The start-up wait of a local Ray ran out."""


@contextmanager
def _start_wait(wait_s: float):
    """Bound a local start by `wait_s`, and let it take that long. Ray's own waits are 30 s: the GCS's is Ray's
    setting RAY_gcs_server_port_wait_time_s; the raylet's (fixed in Ray 2.60's node.py) is a loop around
    services.get_node, which is asked again here until the wait is over instead. Other steps have no wait of their
    own (on a loaded machine one RPC took minutes): a timer signal ends them, from the main thread only and only if
    no other timer runs (a test runner's)."""
    import signal
    import threading

    from ray._private import services

    deadline = time.monotonic() + wait_s
    alarm = (threading.current_thread() is threading.main_thread()
             and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    ask = services.get_node

    def get_node(*args, **kwargs):
        while True:
            try:
                return ask(*args, **kwargs)
            except RuntimeError:  # the raylet has not registered yet
                if time.monotonic() > deadline:
                    raise _StartWaitOver() from None
                time.sleep(0.2)

    setting = "RAY_gcs_server_port_wait_time_s"
    given = os.environ.get(setting)
    if given is None:
        os.environ[setting] = str(max(1, math.ceil(wait_s)))
    services.get_node = get_node
    if alarm:
        previous = signal.signal(signal.SIGALRM, _wait_over)
        signal.setitimer(signal.ITIMER_REAL, wait_s)
    try:
        yield
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        services.get_node = ask
        if given is None:
            os.environ.pop(setting, None)


def _wait_over(signum, frame):
    raise _StartWaitOver()


def _stop_half_started(exc: BaseException) -> None:
    """Stop the processes of a local Ray whose start failed (never `ray stop`: that is host-wide). A node whose
    constructor failed was never handed to Ray, so ray.shutdown() does not know its processes; the traceback's
    frames still hold it."""
    import ray
    from ray._private.node import Node

    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            break
        tb = tb.tb_next
    ray.shutdown()


def _resolve_loopback_as_loopback(address: str) -> None:
    """Joining a Ray that listens on this machine's loopback only (as the local Ray started here does): Ray rewrites
    a loopback address to the host's own, where nothing listens, and retries for many minutes, unless its
    ENABLE_RAY_CLUSTER switch is off (see the local start above); a cluster's address needs it on."""
    from ray._private import ray_constants, services

    from .train.tracking import is_loopback

    if "://" in address:  # ray:// client addresses are resolved by the cluster's client server
        return
    if address == "auto":
        try:
            address = services.get_ray_address_from_environment("auto", None) or ""
        except Exception:  # noqa: BLE001 - no Ray found: ray.init says so itself
            return
    ray_constants.ENABLE_RAY_CLUSTER = not is_loopback(address.rpartition(":")[0])


def check_reachable(address: str, wait_s: float = 15.0) -> None:
    """An explicit `host:port` must accept a TCP connection within `wait_s` seconds: a cluster that does not
    answer is one error line, not a join that waits for minutes. ("auto" and ray:// addresses are left to
    ray.init, which fails at once when no cluster is found.)"""
    import socket
    import time

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise HarnessError(f"--address {address!r}: expected host:port, auto or ray://host:port")
    deadline, last = time.monotonic() + wait_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, wait_s)):
                return
        except OSError as exc:
            last = exc
            time.sleep(1.0)
    raise HarnessError(f"the Ray cluster at --address {address} does not answer after {wait_s:.0f} s ({last}); "
                       "start it (ray start --head) or give its address (auto on the head node)")


def _keep_credentials_out_of_tune() -> None:
    """Ray Tune puts the driver's AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN in every trial actor's runtime_env
    (ray.tune.execution.class_cache), which Ray's runtime-env agent logs in plain text; trials read credentials from
    their own environment or instance role like every other worker instead."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update(CREDENTIAL_ENV)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# -- the Train workers' rendezvous store ------------------------------------------------------------------------
# Ray Train's TorchConfig has rank 0 start torch's TCPStore at its node's address, but TCPStore listens on every
# interface whatever address it is given. platebench's TorchConfig makes rank 0 listen on its node's address only
# (127.0.0.1 on a local Ray, the node's cluster address on a cluster) and hands that socket to the store; the
# process-group setup that follows is Ray's own, and its TCPStore (multi-tenant) reuses the server already serving
# that port in the process instead of opening another.

_STORE = None  # rank 0's store server: alive as long as the worker process (and its process group)
_TORCH_CLASSES: dict = {}


def torch_config(backend: str):
    """Ray Train's TorchConfig for `backend` ("gloo" or "nccl") whose rendezvous store listens on the rank-0
    node's address only."""
    return _torch_classes()["PlatebenchTorchConfig"](backend=backend)


def __getattr__(name: str):
    # Built on first use (ray.train.torch takes seconds to import); Ray's controller and workers unpickle the config
    # by name, which lands here in their processes.
    if name in ("PlatebenchTorchConfig", "PlatebenchTorchBackend"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _serve_store(timeout_s: float):
    """On rank 0: a store server listening on this node's address only; (address, port), or None if it cannot."""
    global _STORE
    import socket
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    addr = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((addr, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        return None
    port, fd = sock.getsockname()[1], sock.detach()
    try:
        _STORE = dist.TCPStore(addr, port, is_master=True, timeout=timedelta(seconds=timeout_s),
                               wait_for_workers=False, multi_tenant=True, master_listen_fd=fd)
    except (TypeError, RuntimeError, ValueError):  # a torch without master_listen_fd (before 2.4)
        os.close(fd)
        return None
    return addr, port


def _set_master(addr: str, port: int, backend: str) -> None:
    import ipaddress
    import socket

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    try:
        if not ipaddress.ip_address(addr).is_loopback:
            return
    except ValueError:  # a host name: not this machine's loopback
        return
    # One machine: gloo's and NCCL's own sockets on loopback too (gloo otherwise binds what the host name resolves
    # to, NCCL the first non-loopback interface), unless the user chose an interface.
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        if backend == "nccl":
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)


def _torch_classes() -> dict:
    if _TORCH_CLASSES:
        return _TORCH_CLASSES
    from dataclasses import dataclass

    import ray
    from ray.train.torch.config import (
        TorchConfig,
        V1WorkerGroup,
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    class PlatebenchTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            served = None
            if backend_config.backend in ("gloo", "nccl") and backend_config.init_method == "env":
                served = worker_group.execute_single(0, _serve_store, backend_config.timeout_s)
            if served is None:  # the address is not bindable here (NAT?) or torch is too old: Ray's own setup
                return super().on_start(worker_group, backend_config)
            # What _TorchBackend.on_start does for env://, with the master address and port of the store above.
            worker_group.execute(_set_master, *served, backend_config.backend)
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                       world_rank=i, world_size=len(worker_group),
                                                       init_method="env://", timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])

    @dataclass
    class PlatebenchTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return PlatebenchTorchBackend

    for cls in (PlatebenchTorchBackend, PlatebenchTorchConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # pickled by reference: found via __getattr__
        _TORCH_CLASSES[cls.__name__] = cls
    return _TORCH_CLASSES
