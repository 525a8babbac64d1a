"""What each result cost, from the runs' done markers (runs/<run_id>/done.json, written by the trainer):

- images/s: training images per second of training, train_images_rank0 × workers / training_s (each rank
  trains its own plates, so rank 0's count times the workers is the job's);
- wall_s: setup_s + training_s + evaluation_s, the run's time on its lane;
- core-hours: (training_s + evaluation_s) × workers × cpus_per_worker / 3600; GPU-hours the same with
  gpus_per_worker (0 on CPU runs).

A training shared by several methods (the same training_id, e.g. ERM and AdaBN of one seed) is counted in
full for each method that uses it and marked `shared`, so a row's cost is what that method alone would cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import HarnessError
from . import stats
from .layout import DONE_FILE, RUNS_DIR, run_file

TIMING_FIELDS = ("setup_s", "training_s", "evaluation_s", "train_images_rank0")
RESOURCE_FIELDS = ("workers", "cpus_per_worker", "gpus_per_worker")
MEASURES = ("images_per_s", "wall_s", "core_hours", "gpu_hours")


def _number(done: dict, section: str, name: str, run_id: str) -> float:
    value = done[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise HarnessError(f"{run_file(RUNS_DIR, run_id, DONE_FILE)}: field '{section}.{name}' must be a number >= 0, "
                           f"got {value!r}")
    return float(value)


def run_cost(run_id: str, done: Mapping) -> dict | None:
    """The cost figures of one run, or None when its done marker predates timings/resources."""
    if not all(isinstance(done.get(s), dict) for s in ("timings", "resources")):
        return None
    t, r = done["timings"], done["resources"]
    if any(f not in t for f in TIMING_FIELDS) or any(f not in r for f in RESOURCE_FIELDS):
        return None
    v = {f: _number(done, "timings", f, run_id) for f in TIMING_FIELDS}
    v.update({f: _number(done, "resources", f, run_id) for f in RESOURCE_FIELDS})
    busy_h = (v["training_s"] + v["evaluation_s"]) / 3600
    images = v["train_images_rank0"] * v["workers"]
    shared_with = sorted(set(done.get("shared_with") or []) - {done.get("method")})
    return {"run_id": run_id, "training_id": done.get("training_id"),
            "images_per_s": images / v["training_s"] if v["training_s"] > 0 else None,
            "wall_s": v["setup_s"] + v["training_s"] + v["evaluation_s"],
            "core_hours": busy_h * v["workers"] * v["cpus_per_worker"],
            "gpu_hours": busy_h * v["workers"] * v["gpus_per_worker"],
            "train_images": images, "workers": v["workers"], "cpus_per_worker": v["cpus_per_worker"],
            "gpus_per_worker": v["gpus_per_worker"], "device": r.get("device"), "shared_with": shared_with}


def _summary(values: list) -> dict:
    vals = [x for x in values if x is not None]
    s = stats.summarize(vals)
    return {"mean": s.mean, "std": s.std, "n": s.n, "total": sum(vals) if vals else None}


def cost_tables(tables: list[dict], done: Mapping[str, Mapping]) -> tuple[list[dict], list[str]]:
    """One cost table per (dataset, scheme, track): the methods of its first test table (out-of-distribution
    splits come first), their accuracy there and their cost per run. Returns (tables, notes)."""
    if not done:
        return [], [f"no cost table: no done marker ({run_file(RUNS_DIR, '<run_id>', DONE_FILE)}) was read for these "
                    "runs"]
    per_run = {rid: run_cost(rid, d) for rid, d in done.items()}
    shared_ids: dict[str, set[str]] = {}
    for d in done.values():
        if d.get("training_id") and d.get("method"):
            shared_ids.setdefault(d["training_id"], set()).add(d.get("method"))
    out, notes, seen = [], [], set()
    for t in tables:
        key = (t["dataset"], t["split_scheme"], t["track"])
        if t["split_role"] != "test" or key in seen:
            continue
        seen.add(key)
        rows, unknown = [], []
        for r in t["rows"]:
            if r.get("reference"):
                continue  # its cost is in the baseline track's table
            costs = [per_run.get(rid) for rid in r.get("run_ids", [])]
            known = [c for c in costs if c is not None]
            if len(known) < len(costs):
                unknown.append(r["method"])
            if not known:
                continue
            # Shared when done.json says so, or when another method among the loaded runs has the same training.
            partners = sorted(({m for c in known for m in c["shared_with"]}
                               | {m for c in known for m in shared_ids.get(c["training_id"], set())}) - {r["method"]})
            rows.append({
                "method": r["method"], "track": r["track"], "accuracy": r["mean"], "accuracy_n": r["n"],
                "complete": r["complete"], "n_runs": len(known), "run_ids": [c["run_id"] for c in known],
                **{m: _summary([c[m] for c in known]) for m in MEASURES},
                "train_images": _summary([c["train_images"] for c in known]),
                "devices": sorted({str(c["device"]) for c in known}),
                "workers": sorted({c["workers"] for c in known}),
                "cpus_per_worker": sorted({c["cpus_per_worker"] for c in known}),
                "gpus_per_worker": sorted({c["gpus_per_worker"] for c in known}),
                "shared": bool(partners), "shared_with": partners,
                "training_ids": sorted({c["training_id"] for c in known if c["training_id"]}),
                "sources": r.get("sources", []),
            })
        if unknown:
            notes.append(f"{'/'.join(key)}: no cost facts (done.json timings and resources) for some runs of "
                         f"{', '.join(sorted(set(unknown)))}")
        if rows:
            rows.sort(key=lambda x: (x["core_hours"]["mean"] is None, x["core_hours"]["mean"] or 0, x["method"]))
            out.append({"dataset": t["dataset"], "split_scheme": t["split_scheme"], "track": t["track"],
                        "split": t["split"], "rows": rows,
                        "uses_gpus": any(g > 0 for x in rows for g in x["gpus_per_worker"])})
    return out, notes
