"""One job on one rank of a lane: one training, evaluated under every protocol that shares it (ERM's training
under ERM's and AdaBN's protocols). Ranks train disjoint plates and gather evaluation counts.

1. set up: the dataset (kept by the lane) with every part of the scheme's splits verified before anything is
   written (harness/train/part_check.py), the seeded trained method and one instance per protocol, the
   channel statistics, the MLflow runs;
2. train epoch after epoch, validating every protocol (harness/train/epochs.py), unless the training is
   done already;
3. a protocol whose records lack epochs the training has (one added after the training ran) is first
   evaluated on the validation splits from the kept weights: nothing is trained twice;
4. per run: test splits, TTA sweeps and representation at its selectable epochs
   (harness/train/selectable_epochs.py), then its done marker (harness/train/run_done.py).
"""

from __future__ import annotations

import time

from ..results.layout import MAIN_EPOCH_FILES, read_done, records_dir, write_run_file
from .code_identity import commit
from .epochs import seed_all, train_epochs
from .evaluate import Evaluator
from .job_state import JobState
from .jobs import Job
from .lane import Lane
from .part_check import verify_job_parts
from .run_done import finish_run
from .runspec import RunSpec, build_method, task_spec
from .selectable_epochs import evaluate_selectable, selection


def run_job(job: Job, lane: Lane, queue) -> list[dict]:
    """Every run of `job` to its done marker; returns one done marker per run (finished before: "skipped")."""
    from platebench.methods.distributed import all_gather_objects

    t0 = time.perf_counter()
    done = {r.run_id: read_done(lane.launch.storage, r.run_id, lane.launch.options) for r in job.runs}
    todo = [r for r in job.runs if done[r.run_id] is None]
    if not todo:
        return [{**d, "skipped": True} for d in done.values()]
    ds = lane.dataset(job.runs[0].data)
    verify_job_parts(ds, job.training.split_scheme, lane)  # a damaged test part fails the job here, not after training
    state = JobState.open(job, lane, queue)
    t, device = job.training, lane.device
    task = task_spec(ds)
    seed_all(t.seed)  # same seed on every rank: identical initial parameters
    trainer = build_method(t, task, device)
    protocols = {r.run_id: build_method(r, task, device) for r in todo}
    state.channel_stats = _channel_stats(state, ds)
    evaluators = {r.run_id: Evaluator(ds, r, protocols[r.run_id], lane.rank, lane.world, device, lane.cache,
                                      state.channel_stats) for r in todo}
    _open_tracking(state, todo)
    state.timings["setup_s"] = time.perf_counter() - t0

    finished = state.store.read_done()
    if finished is None:
        train_epochs(state, ds, task, trainer, todo, protocols, evaluators)
        finished = state.store.read_done() if lane.rank == 0 else None
    # epochs < planned: stopped early (or diverged: the epoch it did, else None)
    epochs, diverged = all_gather_objects([(finished["epochs"], finished.get("diverged_epoch"))
                                           if lane.rank == 0 else None])[0]
    for spec in todo:  # protocols that missed epochs (added later, or replayed): from the kept weights
        _catch_up(state, spec, protocols[spec.run_id], evaluators[spec.run_id], epochs)
    _record_placement(state, todo)
    # Every run sharing this training is also tested at the others' selectable epochs, so a variant (AdaBN)
    # can be compared with its parent (ERM) on the same checkpoint (harness/results/same_checkpoint.py).
    selections = {spec.run_id: selection(state, spec, epochs) for spec in job.runs}
    shared = sorted({e for s in selections.values() for e in s["chosen"]})
    results = []
    for spec in todo:
        selected = evaluate_selectable(state, spec, protocols[spec.run_id], evaluators[spec.run_id], epochs,
                                       selections[spec.run_id], shared)
        results.append(finish_run(state, spec, selected, epochs, diverged) if lane.rank == 0 else {})
    lane.tracker.close(t.training_id)
    lane.tracker.flush()
    return [*({**d, "skipped": True} for d in done.values() if d is not None), *results]


def _channel_stats(state: JobState, ds):
    """Per-channel training statistics for `normalize: dataset` (None: images are self-standardised),
    computed once per training and stored beside its weights."""
    from platebench.methods.distributed import all_gather_objects

    from ..data.channel_stats import channel_stats

    if state.training.hparams["normalize"] != "dataset":
        return None
    stats = None
    if state.lane.rank == 0:
        stats = state.store.read_json("channel_stats.json")
        if stats is None:
            stats = channel_stats(ds, state.training.split_scheme, "train", state.lane.cache)
            state.store.write_json("channel_stats.json", stats)
    mean, std = all_gather_objects([stats])[0]
    return tuple(mean), tuple(std)


def _open_tracking(state: JobState, todo: list[RunSpec]) -> None:
    tracker, t, world = state.lane.tracker, state.training, state.lane.world
    tracker.open(t.training_id, f"train {t.method} seed {t.seed}", "training",
                 {**t.hparams, "method": t.method, "seed": t.seed, "backbone": t.backbone, "dataset": t.dataset,
                  "dataset_checksum": t.dataset_checksum, "split_scheme": t.split_scheme,
                  "code": f"{t.code['version']}+{t.code['source']}", "training_id": t.training_id,
                  "workers": world, "shared_by": ",".join(r.method for r in state.job.runs)})
    for spec in todo:
        tracker.open(spec.run_id, f"{spec.method} seed {spec.seed}", "seed",
                     {**spec.hparams, "method": spec.method, "seed": spec.seed, "backbone": spec.backbone,
                      "dataset": spec.dataset, "dataset_checksum": spec.dataset_checksum,
                      "split_scheme": spec.split_scheme, "code": spec.code_label,
                      "git_commit": commit() or "unknown", "run_id": spec.run_id,
                      "training_id": t.training_id, "workers": world},
                     parent_key=t.training_id, tags={"platebench.run_id": spec.run_id,
                                                     "platebench.training_id": t.training_id})


def _recorded_epochs(state: JobState, spec: RunSpec) -> set[int]:
    from platebench.datasets.storage import filesystem, join

    fs, root = filesystem(state.launch.storage, state.launch.options)
    files = fs.glob(join(records_dir(root, spec.run_id), MAIN_EPOCH_FILES))
    return {int(f.rsplit("-", 1)[1][:5]) for f in files}


def _catch_up(state: JobState, spec: RunSpec, method, evaluator: Evaluator, epochs: int) -> None:
    """Validation records for the epochs `spec` lacks, from the kept weights."""
    from platebench.methods.distributed import all_gather_objects

    missing = sorted(set(range(1, epochs + 1)) - _recorded_epochs(state, spec)) if state.lane.rank == 0 else None
    for epoch in all_gather_objects([missing])[0]:
        state.progress(epoch, f"validation of {spec.method} from kept weights")
        state.validate(spec, method, evaluator, state.store.load_weights(epoch, state.lane.device), epoch)


def _record_placement(state: JobState, todo: list[RunSpec]) -> None:
    """Which node each rank ran on (runs/<run_id>/placement.json), for multi-node checks and debugging."""
    import ray
    from platebench.methods.distributed import all_gather_objects

    everyone = all_gather_objects([{"rank": state.lane.rank, "node_id": ray.get_runtime_context().get_node_id()}])
    state.placement = sorted(everyone, key=lambda r: r["rank"])
    if state.lane.rank == 0:
        for spec in todo:
            write_run_file(state.launch.storage, spec.run_id, "placement.json", state.placement, state.launch.options)
