"""MLflow: the user-facing view of runs (records in storage stay the source of truth).

The driver creates the experiment (with an explicit artifact location: an experiment created inside a
Ray worker would put its artifacts in Ray's temp session dir, ray-research §4) and one parent run per
`platebench run`/`bench`/`sweep`. Rank 0 of each Train run opens its child run with Ray's
`setup_mlflow` (tagged with the parent) and re-attaches to the same child after a resume. MLflow
failures never stop training: they are counted as gaps and reported when the run ends.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HarnessError

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


@dataclass
class RunTracker:
    """Rank 0's child run. Every call is guarded: a failure is a gap, never a training error."""

    target: MlflowTarget | None
    run_id: str | None = None
    gaps: list[str] = field(default_factory=list)
    _mlflow: object = None

    def start(self, name: str, params: dict, tags: dict) -> None:
        if self.target is None:
            return
        for k, v in MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        try:
            import mlflow

            if self.run_id:  # resumed: keep logging into the same child run
                mlflow.set_tracking_uri(self.target.tracking_uri)
                mlflow.start_run(run_id=self.run_id)
                self._mlflow = mlflow
            else:
                from ray.air.integrations.mlflow import setup_mlflow

                if self.target.parent_run_id:
                    tags = {**tags, "mlflow.parentRunId": self.target.parent_run_id}
                self._mlflow = setup_mlflow(flat_params(params), tracking_uri=self.target.tracking_uri,
                                            experiment_id=self.target.experiment_id, run_name=name, tags=tags,
                                            rank_zero_only=True)
                active = self._mlflow.active_run() if hasattr(self._mlflow, "active_run") else None
                self.run_id = active.info.run_id if active else None
        except Exception as exc:  # noqa: BLE001
            self._gap("start", exc)

    def _gap(self, what: str, exc: Exception) -> None:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        self.gaps.append(f"{what}: {type(exc).__name__}: {first[:160]}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_metrics(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            self._gap(f"metrics of epoch {step}", exc)

    def log_artifact(self, path: str) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_artifact(path)
        except Exception as exc:  # noqa: BLE001
            self._gap(f"artifact {Path(path).name}", exc)

    def finish(self, status: str = "FINISHED") -> None:
        if self._mlflow is None:
            return
        try:
            if self.gaps:
                self._mlflow.set_tag("platebench.mlflow_gaps", "; ".join(self.gaps)[:4000])
            self._mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001
            self._gap("end", exc)
