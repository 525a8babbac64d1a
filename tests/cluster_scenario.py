"""Multi-node on one machine (run by test_cluster.py in a subprocess: a Cluster needs its own Ray).

Head + one more node (3 logical CPUs each). (1) The same 2-worker run twice: STRICT_SPREAD (one
worker per node) and PACK (both on the head); their records must match. (2) A 2-trial sweep whose
trials each need 2 CPUs, so the two concurrent trials can only run on different nodes.
Prints one JSON object with what the test checks.
"""

import json
import sys
from pathlib import Path

from platebench.harness import ray_local

ray_local.apply_env()

from platebench.datasets.shards import open_dataset  # noqa: E402
from platebench.harness.records import read_records  # noqa: E402
from platebench.harness.runner import Launch, fit_run  # noqa: E402
from platebench.harness.runspec import build_specs  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def main(data: str, work: str) -> None:
    import socket

    with socket.socket() as sock:  # the test session's own Ray may hold the default dashboard port
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray_local.init(address=cluster.address)
    import ray

    out = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    try:
        ds = open_dataset(data)
        spec = build_specs(ds, "new_batches", "erm", {"epochs": 2, "batch_size": 4}, [0], "resnet-tiny")[0]
        for name, strategy in (("spread", "STRICT_SPREAD"), ("pack", "PACK")):
            launch = Launch(storage=f"{work}/{name}", workers=2, placement_strategy=strategy, max_failures=0)
            res = fit_run(spec, launch)
            out[f"{name}_placement"] = res.get("placement")
            rows = read_records(launch.storage).to_pylist()
            out[f"{name}_records"] = sorted((r["epoch"], r["split"], r["domain_kind"], r["domain"], r["metric"],
                                             round(r["value"], 6)) for r in rows)
        from platebench.harness import sweep, tune_space

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
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
