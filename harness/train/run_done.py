"""A run's end, written by rank 0 once every record is: its last MLflow texts, then its done marker
(runs/<run_id>/done.json) with the facts reports read from it: the selected epochs, timings, the software
environment, the resources and the node of each rank."""

from __future__ import annotations

import torch

from ..results.layout import write_run_done
from .code_identity import commit
from .job_state import JobState
from .runspec import RunSpec


def finish_run(state: JobState, spec: RunSpec, selected: dict, epochs: int, diverged_epoch: int | None = None) -> dict:
    """`spec`'s done marker as written (`selected`: from selectable_epochs.selection; `epochs`: those the
    training ran; `diverged_epoch`: where its training loss stopped being finite, if it did)."""
    lane, timings = state.lane, state.timings
    chosen, best = selected["chosen"], selected["best"]
    state.log_json(spec.run_id, "config.json", spec.to_dict())
    state.log_json(spec.run_id, "selected.json", {"selectable_epochs": chosen, "best_val_epoch": best})
    lane.tracker.close(spec.run_id)
    lane.tracker.flush()
    return write_run_done(state.launch.storage, spec, {
        "training_id": state.training.training_id, "shared_with": [r.method for r in state.job.runs],
        "selected_epoch": best, "selectable_epochs": chosen, "git_commit": commit(),
        "final_metrics": {"epoch": epochs, "val_accuracy": selected["last_val"]}, "diverged_epoch": diverged_epoch,
        "timings": {"setup_s": timings["setup_s"], "training_s": timings["train_s"],
                    "evaluation_s": timings["eval_s"].get(spec.run_id, 0.0),
                    # part of evaluation_s: the representation analysis at the selected epoch
                    "representation_s": timings["representation_s"].get(spec.run_id, 0.0),
                    "trained_epochs": timings["epochs"], "lane": lane.name,
                    # images of rank 0 (each rank trains its own plates): x workers for the whole job
                    "train_images_rank0": timings["train_images"]},
        "environment": environment(),
        "resources": {"workers": lane.world, "cpus_per_worker": state.launch.cpus_per_worker,
                      "gpus_per_worker": 1 if state.launch.use_gpu else 0, "device": device_name(lane.device)},
        "placement": state.placement, "mlflow_gaps": list(lane.tracker.gaps.get(spec.run_id, [])),
        "mlflow_run_id": lane.tracker.run_ids.get(spec.run_id)}, state.launch.options)


def environment() -> dict:
    """The versions a run trained with (bundles and leaderboards report them)."""
    import platform
    from importlib.metadata import version

    import ray

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platebench": version("platebench")}


def device_name(device) -> str:
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
