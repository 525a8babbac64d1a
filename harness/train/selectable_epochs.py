"""A run's evaluation beyond the validation splits, only at the epochs a leaderboard rule can choose from
its validation records (the best validation epoch and the last), from the kept weights: the test splits at
each, the TTA sweeps at the best validation epoch, and the representation analysis at the selected epoch."""

from __future__ import annotations

import time

from platebench.methods import Method

from ..analysis.representation import analyze, tracking_metrics, training_batches
from ..errors import HarnessError
from ..results.records import main_value, read_records
from ..results.selection import LEADERBOARD_RULES, select_epoch
from . import faults
from .evaluate import Evaluator
from .job_state import JobState
from .runspec import RunSpec
from .tracking import epoch_metrics


def selection(state: JobState, spec: RunSpec, epochs: int) -> dict:
    """From `spec`'s validation records: the epochs a leaderboard rule can choose, the best-validation
    epoch (None without a validation split) and the last epoch's validation accuracy (same on every rank)."""
    from platebench.methods.distributed import all_gather_objects

    out = None
    if state.lane.rank == 0:
        rows = read_records(state.launch.storage, state.launch.options, run_ids=[spec.run_id]).to_pylist()
        chosen, best, val = set(), None, None
        for rule in LEADERBOARD_RULES:
            try:
                sel = select_epoch(rows, rule)
            except HarnessError:  # e.g. a scheme without a validation split: only "last-epoch" applies
                continue
            chosen.add(sel.epoch)
            if rule == "val":
                best = sel.epoch
                val = main_value([r for r in rows if r["epoch"] == epochs], sel.split)
        out = {"chosen": sorted(chosen or {epochs}), "best": best, "last_val": val}
    return all_gather_objects([out])[0]


def evaluate_selectable(state: JobState, spec: RunSpec, method: Method, evaluator: Evaluator, epochs: int,
                        selected: dict, shared_epochs: list[int]) -> dict:
    """Test splits at `spec`'s selectable epochs (`selected`, from `selection`; `epochs`: those the training ran)
    and at `shared_epochs` (those of every run sharing its training); the TTA sweeps and the representation
    analysis at its own. Returns `selected`."""
    lane, launch = state.lane, state.launch
    fault = faults.parse(launch.fault)

    def drill(phase: str, epoch: int) -> None:  # --inject-fault phase=tests|sweeps|representation
        faults.maybe_fail(fault, launch.storage, launch.options, spec.run_id, epoch - 1, 0, lane.rank, phase)

    chosen, best = selected["chosen"], selected["best"]
    state.progress(epochs, f"test splits of {spec.method}")
    for epoch in sorted(set(chosen) | set(shared_epochs)):
        drill("tests", epoch)
        method.load_state_dict(state.store.load_weights(epoch, lane.device))
        rows = state.timed_eval(spec.run_id, evaluator.main, method, epoch, evaluator.test_splits)
        state.write(spec, epoch, rows, kind="tests")
        if lane.rank == 0:
            lane.tracker.log_metrics(spec.run_id, epoch_metrics(rows), epoch, "tests")
        if epoch == best and evaluator.track == "tta":
            state.progress(epochs, f"TTA sweeps of {spec.method}")
            drill("sweeps", epoch)
            state.write(spec, epoch, state.timed_eval(spec.run_id, evaluator.sweeps, method, epoch), "sweeps")
        if epoch == (best or max(chosen)):
            state.progress(epochs, f"representation of {spec.method}")
            drill("representation", epoch)
            t0 = time.perf_counter()
            analysis = state.timed_eval(spec.run_id, analyze, method, evaluator, training_batches(evaluator), epoch)
            state.timings["representation_s"][spec.run_id] = time.perf_counter() - t0
            state.write(spec, epoch, analysis.rows, kind="representation")
            if lane.rank == 0 and analysis.rows:
                lane.tracker.log_metrics(spec.run_id, tracking_metrics(analysis.rows), epoch, "representation")
                state.log_json(spec.run_id, "representation/bn_shift.json", analysis.bn_shift)
    return selected
