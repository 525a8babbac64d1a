"""Multi-node on one machine (run by test_cluster.py in a subprocess: a Cluster needs its own Ray).

Head + one more node (3 logical CPUs each). (1) The same 2-worker run twice: STRICT_SPREAD (one
worker per node) and PACK (both on the head); their records must match. (2) A run placed on the
second node (2 of the head's CPUs held) logs to the driver's MLflow tracking server (`mlflow server`
on 127.0.0.1, its URI resolved by session.open_tracking as for `--address`). (3) A 2-trial sweep whose
trials each need 2 CPUs, so the two concurrent trials can only run on different nodes.
Prints one JSON object with what the test checks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from platebench.harness import ray_local
from platebench.methods.distributed import free_port  # noqa: E402

ray_local.apply_env()

from platebench.datasets.shards import open_dataset  # noqa: E402
from platebench.harness.results.records import read_records  # noqa: E402
from platebench.harness.train.runner import Launch, fit_run  # noqa: E402
from platebench.harness.train.runspec import build_specs  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def _start_mlflow_server(work: str) -> tuple[subprocess.Popen, str]:
    """The driver's tracking server: loopback only, SQLite store in `work` (its own session: stopped as a group)."""
    port, root = free_port(), Path(work) / "mlflow-server"
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
                             str(root / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_for(uri: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=10) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {uri} did not start (rc {proc.poll()})")


def _mlflow_on_second_node(data: str, work: str, uri: str, address: str, head_id: str) -> dict:
    """A 1-worker run that only the second node can take, logging to the driver's tracking server."""
    import ray
    from mlflow.tracking import MlflowClient
    from platebench.harness.commands import session
    from platebench.harness.train import tracking
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    args = SimpleNamespace(no_mlflow=False, out=f"{work}/mlflow-out", mlflow_uri=uri, address=address)
    target = session.open_tracking(args, experiment="platebench/cluster", parent_name="cluster scenario", params={})
    hold = NodeAffinitySchedulingStrategy(node_id=head_id, soft=False)
    blocker = ray.remote(num_cpus=2)(_Blocker).options(scheduling_strategy=hold).remote()
    ray.get(blocker.ready.remote())
    try:
        spec = build_specs(open_dataset(data), "new_batches", "erm", {"epochs": 1, "batch_size": 4}, [0],
                           "resnet-tiny")[0]
        launch = Launch(storage=f"{work}/mlflow-run", workers=1, cpus_per_worker=2, max_failures=0, mlflow=target)
        res = fit_run(spec, launch)
    finally:
        ray.kill(blocker)
    tracking.end_parent(target.tracking_uri, target.parent_run_id)
    runs = MlflowClient(target.tracking_uri).search_runs(
        [target.experiment_id], filter_string=f"tags.`platebench.run_id` = '{spec.run_id}'")
    return {"mlflow_uri_given": uri, "mlflow_uri": target.tracking_uri,
            "mlflow_rank0_node": res["placement"][0]["node_id"], "mlflow_gaps": res.get("mlflow_gaps"),
            "mlflow_seed_runs": [{"kind": r.data.tags.get("platebench.kind"), "status": r.info.status,
                                  "metrics": sorted(r.data.metrics)} for r in runs]}


class _Blocker:
    def ready(self) -> bool:
        return True


def main(data: str, work: str) -> None:
    # MLflow's client gives up after 5 s (harness/tracking.py); this box may be that slow under load, and what is
    # checked here is where the runs go. Set before the nodes start: their workers inherit it.
    os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT="60", MLFLOW_HTTP_REQUEST_MAX_RETRIES="3")
    server, uri = _start_mlflow_server(work)  # starts while the cluster does
    dashboard_port = free_port()  # the test session's own Ray may hold the default dashboard port
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": dashboard_port})
    second = cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray_local.init(address=cluster.address)
    import ray

    out = {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "second_node": second.node_id}
    try:
        ds = open_dataset(data)
        spec = build_specs(ds, "new_batches", "erm", {"epochs": 1, "batch_size": 4}, [0], "resnet-tiny")[0]
        for name, strategy in (("spread", "STRICT_SPREAD"), ("pack", "PACK")):
            launch = Launch(storage=f"{work}/{name}", workers=2, placement_strategy=strategy, max_failures=0)
            res = fit_run(spec, launch)
            out[f"{name}_placement"] = res.get("placement")
            rows = read_records(launch.storage).to_pylist()
            out[f"{name}_records"] = sorted((r["epoch"], r["split"], r["domain_kind"], r["domain"], r["metric"],
                                             round(r["value"], 6)) for r in rows)
        _wait_for(uri, server)
        out.update(_mlflow_on_second_node(data, work, uri, cluster.address, cluster.head_node.node_id))
        from platebench.harness.tune import space as tune_space
        from platebench.harness.tune import sweep

        cfg = sweep.SweepConfig(data=data, split_scheme="new_batches", method="erm",
                                space=tune_space.for_method("erm"), trials=2, search="random", scheduler="none",
                                max_concurrent=2, fixed_hparams={"epochs": 1, "batch_size": 4})
        launch = Launch(storage=f"{work}/sweep", cpus_per_worker=2)
        result = sweep.run_sweep(cfg, launch)
        placements = []
        for t in result["trials"]:
            p = Path(sweep.trial_storage(launch, result["experiment"])) / "runs" / t["run_id"] / "placement.json"
            placements.append(json.loads(p.read_text())[0]["node_id"])
        out["sweep_trial_nodes"] = placements
        out["sweep_errors"] = [t["error"] for t in result["trials"] if t["error"]]
    finally:
        ray_local.shutdown()
        cluster.shutdown()
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, started in their own session
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
