"""MLflow: the user-facing view of runs (records in storage stay the source of truth).

The driver creates the experiment (with an explicit artifact location: an experiment created inside a
Ray worker would put its artifacts in Ray's temp session dir) and one parent run per
`platebench run`/`bench`/`sweep`. Under it, rank 0 of a lane opens one run per training and, nested under
that, one run per evaluated method (AdaBN's run sits under the ERM training it shares), all from a
background thread. MLflow failures never stop training: they are counted as gaps and reported when the
run ends.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from ..errors import HarnessError

# Fail fast instead of retrying for minutes when the server is down (training must continue).
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None = None


def default_uri(out_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1, localhost (and 0.0.0.0 / ::, which a client reaches on its own host)."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def worker_tracking_uri(uri: str, driver_ip: str | None, nodes: int, cluster: bool = False) -> str:
    """The tracking URI as the driver, Train workers and Tune trials on every node must use it.

    On one machine (one node, or every node on loopback: the driver node's address is 127.0.0.1) `uri` as given.
    On a cluster (`nodes` > 1 or `cluster`: joined with --address) a loopback host would be each worker's own node,
    so it becomes the driver node's address; a file store (sqlite:///, a path) exists on the driver's node only and
    is refused. A password in the URI is refused everywhere: the URI travels to every worker and into messages.
    """
    parsed = urlparse(uri)
    if parsed.password:
        raise HarnessError("the MLflow URI carries a password, which would travel to every worker and into logs; "
                           "give the URI without it and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                           "(an MLflow server with --app-name basic-auth)")
    if (nodes <= 1 and not cluster) or is_loopback(driver_ip):
        return uri
    fix = "use --mlflow-uri http://<head-ip>:5000 (the MLflow server on the head node) or --no-mlflow"
    # MLflow reads a URI without a scheme as a local path, "databricks" aside
    if parsed.scheme in ("file", "sqlite") or (not parsed.scheme and uri not in ("databricks", "databricks-uc")):
        raise HarnessError(f"MLflow store {uri} is a file on the driver's node, which Train workers on other nodes "
                           f"cannot reach; {fix}")
    if not is_loopback(parsed.hostname):
        return uri
    if not driver_ip:
        raise HarnessError(f"MLflow URI {uri} is this node's loopback, which workers on other nodes cannot reach, "
                           f"and the driver node's address is unknown; {fix}")
    host = f"[{driver_ip}]" if ":" in driver_ip else driver_ip
    netloc = (f"{parsed.username}@" if parsed.username else "") + host + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def open_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """Experiment id for `name`, created if needed; a clear error if the tracking server is unreachable."""
    for k, v in MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = artifact_root
        if location is None and tracking_uri.startswith("sqlite:///"):
            location = Path(tracking_uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; all mean "cannot track"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"MLflow tracking server {tracking_uri} is unreachable or refused ({first[:200]})") from None


def start_parent(tracking_uri: str, experiment_id: str, name: str, params: dict, tags: dict | None = None,
                 reuse: bool = False) -> str:
    """Create the parent run; with `reuse`, continue the latest parent of the same name (a resumed sweep)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if reuse:
        found = client.search_runs([experiment_id], filter_string=f"tags.`platebench.kind` = 'parent' and "
                                                                  f"attributes.run_name = '{name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={"platebench.kind": "parent", **(tags or {})})
    for key, value in flat_params(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def end_parent(tracking_uri: str, run_id: str, status: str = "FINISHED", artifacts: list[str] | None = None) -> None:
    """Attach artifacts and close the parent run; if MLflow is down by now, warn (records are complete)."""
    import sys

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        for path in artifacts or []:
            client.log_artifact(run_id, path)
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - the results are safe in storage; the MLflow view is incomplete
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"warning: could not finish MLflow run {run_id} at {tracking_uri} ({first[:160]}); "
              f"the records in storage are complete", file=sys.stderr)


def flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(*parts: str) -> str:
    return "/".join(_METRIC_CHARS.sub("_", p) for p in parts if p)


def epoch_metrics(rows: list[dict]) -> dict[str, float]:
    """Per-split, per-domain metrics of one evaluation, named like `test/accuracy/batch:b5`."""
    out = {}
    for r in rows:
        if r["protocol"] != "main":
            continue
        suffix = "" if r["domain_kind"] == "all" else f"{r['domain_kind']}:{r['domain']}"
        out[metric_name(r["split"], r["metric"], suffix)] = float(r["value"])
    return out


PHASES = ("train", "val", "tests", "representation")


class BackgroundTracker:
    """MLflow writes of a lane's trainings and runs, made by one background thread in submission order, so
    training never waits for the tracking server. Every write is guarded: a failure is a gap, never a
    training error.

    Runs are found again by their platebench key (a training id or a run id, tag `platebench.key`) rather than
    created anew, so a resumed training logs into the same MLflow runs; epochs that MLflow already holds (an
    epoch repeated after a worker restart) are not logged twice.
    """

    def __init__(self, target: MlflowTarget | None, flush_timeout: float = 120.0):
        import queue
        import threading

        self.target, self.flush_timeout = target, flush_timeout
        self.run_ids: dict[str, str] = {}
        self.gaps: dict[str, list[str]] = {}
        self._logged: dict[str, set[tuple[str, int]]] = {}
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        if target is not None:
            for k, v in MLFLOW_ENV.items():
                os.environ.setdefault(k, v)
            threading.Thread(target=self._work, name="platebench-mlflow", daemon=True).start()

    # -- the caller's side (returns at once) -------------------------------------------------------
    def open(self, key: str, name: str, kind: str, params: dict, parent_key: str | None = None,
             tags: dict | None = None) -> None:
        self._put(self._open, key, name, kind, params, parent_key, tags or {})

    def log_metrics(self, key: str, metrics: dict[str, float], step: int, phase: str) -> None:
        """Log `metrics` at `step` once per (phase, step): a replayed epoch is not logged again."""
        self._put(self._log_metrics, key, metrics, step, phase)

    def log_text(self, key: str, filename: str, text: str) -> None:
        self._put(self._log_text, key, filename, text)

    def close(self, key: str, status: str = "FINISHED") -> None:
        self._put(self._close, key, status)

    def flush(self) -> None:
        """Wait (at most `flush_timeout` s) for the writes so far; what did not make it becomes a gap."""
        if self.target is None:
            return
        import threading

        done = threading.Event()
        self._queue.put((done.set, ()))
        if not done.wait(self.flush_timeout):
            for key in list(self.run_ids):
                self.gaps.setdefault(key, []).append(f"MLflow writes still pending after {self.flush_timeout:.0f} s")

    # -- the thread's side ---------------------------------------------------------------------------
    def _put(self, fn, *args) -> None:
        if self.target is not None:
            self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; each is a gap
                key = args[0] if args and isinstance(args[0], str) else "mlflow"
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                self.gaps.setdefault(key, []).append(f"{fn.__name__.strip('_')}: {type(exc).__name__}: "
                                                     f"{first[:160]}")

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.target.tracking_uri)
        return self._client

    def _open(self, key, name, kind, params, parent_key, tags) -> None:
        client = self._mlflow()
        found = client.search_runs([self.target.experiment_id], filter_string=f"tags.`platebench.key` = '{key}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self._logged[key] = {(phase, int(m.step)) for phase in PHASES
                                 for m in client.get_metric_history(run_id, f"logged/{phase}")}
        else:
            parent = self.run_ids.get(parent_key) if parent_key else self.target.parent_run_id
            all_tags = {"platebench.key": key, "platebench.kind": kind, **tags}
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            run_id = client.create_run(self.target.experiment_id, run_name=name, tags=all_tags).info.run_id
            from mlflow.entities import Param

            flat = flat_params(params)
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):  # MLflow's batch limit for params
                client.log_batch(run_id, params=items[i:i + 100])
            self._logged[key] = set()
        self.run_ids[key] = run_id

    def _log_metrics(self, key, metrics, step, phase) -> None:
        if key not in self.run_ids or (phase, step) in self._logged.get(key, set()):
            return
        import time as _time

        from mlflow.entities import Metric

        now = int(_time.time() * 1000)
        # the marker metric says which (phase, epoch) MLflow holds, read back when the run is reopened
        items = [Metric(k, float(v), now, step) for k, v in {**metrics, f"logged/{phase}": 1.0}.items()]
        for i in range(0, len(items), 1000):
            self._mlflow().log_batch(self.run_ids[key], metrics=items[i:i + 1000])
        self._logged.setdefault(key, set()).add((phase, step))

    def _log_text(self, key, filename, text) -> None:
        if key in self.run_ids:
            self._mlflow().log_text(self.run_ids[key], text, filename)

    def _close(self, key, status) -> None:
        if key not in self.run_ids:
            return
        client = self._mlflow()
        if self.gaps.get(key):
            client.set_tag(self.run_ids[key], "platebench.mlflow_gaps", "; ".join(self.gaps[key])[:4000])
        client.set_terminated(self.run_ids[key], status=status)
