"""Synthetic storage roots for the merge, ranking and page tests: records written with
harness.records.write_epoch_records and done markers shaped like the trainer's, on two datasets.

Every run evaluates val (role val), test and id_test (role test) at epochs 1 and 2; epoch 2 has the higher
validation accuracy, so it is selected, and there a method's Total accuracy is BLOCK_MEANS[block][method] plus
the seed's offset (offsets sum to zero: the mean over seeds 0-2 is the table's value). Standard track: erm, m1,
m2, m3; tta track: t1+tta. In alpha/s1/id_test m1 and m2 tie (average ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

from platebench.harness.results.records import write_epoch_records

BLOCK_MEANS = {
    ("alpha", "s1", "test"): {"erm": 0.50, "m1": 0.55, "m2": 0.45, "m3": 0.40, "t1+tta": 0.52},
    ("alpha", "s1", "id_test"): {"erm": 0.70, "m1": 0.72, "m2": 0.72, "m3": 0.60, "t1+tta": 0.71},
    ("beta", "s2", "test"): {"erm": 0.30, "m1": 0.28, "m2": 0.35, "m3": 0.25, "t1+tta": 0.33},
    ("beta", "s2", "id_test"): {"erm": 0.60, "m1": 0.66, "m2": 0.58, "m3": 0.50, "t1+tta": 0.61},
}
METHODS = ("erm", "m1", "m2", "m3", "t1+tta")
SEED_OFFSET = {0: -0.01, 1: 0.0, 2: 0.01}
DOMAINS = {"val": ("b5", "b6"), "test": ("b7", "b8"), "id_test": ("b1", "b2")}
ROLE = {"val": "val", "test": "test", "id_test": "test"}
CHECKSUM = {"alpha": "a" * 64, "beta": "b" * 64}
HPARAMS = '{"lr":0.001}'


def run_id(method: str, dataset: str, seed: int) -> str:
    return f"{method.replace('+', '-')}-{dataset}-s{seed}"


def _row(rid, method, dataset, seed, epoch, split, kind, domain, value, metric="accuracy", protocol="main", ebs=0,
         checksum=None):
    return dict(run_id=rid, dataset=dataset, dataset_checksum=checksum or CHECKSUM[dataset],
                split_scheme="s1" if dataset == "alpha" else "s2", method=method,
                track="tta" if method.endswith("+tta") else "standard", seed=seed, hparams=HPARAMS, epoch=epoch,
                split=split, split_role=ROLE[split], domain_kind=kind, domain=domain, eval_batch_size=ebs,
                n_controls=0, protocol=protocol, metric=metric, value=value, n=100, code="0.1.0+fixture")


def value(dataset: str, split: str, method: str, seed: int, epoch: int) -> float:
    scheme = "s1" if dataset == "alpha" else "s2"
    base = 0.40 + 0.01 * METHODS.index(method) if split == "val" else BLOCK_MEANS[(dataset, scheme, split)][method]
    return base + SEED_OFFSET[seed] - (0.05 if epoch == 1 else 0.0)


def done_marker(method: str, dataset: str, seed: int, training_s: float, evaluation_s: float = 2.0,
                workers: int = 1, cpus: float = 2.0, gpus: int = 0) -> dict:
    """A done.json as the trainer writes it (only the fields the leaderboard reads, plus identity)."""
    rid = run_id(method, dataset, seed)
    trains_as = "erm" if method == "m1" else method  # m1 shares erm's training, like AdaBN
    return {"run_id": rid, "method": method, "seed": seed, "selected_epoch": 2,
            "training_id": f"{trains_as}-{dataset}-s{seed}-train",
            "shared_with": ["erm", "m1"] if trains_as == "erm" else [method],
            "timings": {"setup_s": 1.5, "training_s": training_s, "evaluation_s": evaluation_s,
                        "trained_epochs": 2, "train_images_rank0": 1000},
            "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                          "device": "cpu (fixture)"}}


def write_root(root: Path | str, datasets=("alpha", "beta"), methods=METHODS, seeds=(0, 1, 2), *,
               perturb: dict | None = None, checksum: dict | None = None, with_done: bool = True,
               sweeps: bool = True) -> str:
    """A storage root. `perturb`: {run_id: delta} added to that run's test values (a conflicting copy);
    `checksum`: {dataset: checksum} to record another dataset version."""
    root = Path(root)
    for ds in datasets:
        for method in methods:
            for seed in seeds:
                rid = run_id(method, ds, seed)
                cs = (checksum or {}).get(ds)
                for epoch in (1, 2):
                    rows = []
                    for split, doms in DOMAINS.items():
                        v = value(ds, split, method, seed, epoch)
                        if split != "val":
                            v += (perturb or {}).get(rid, 0.0)
                        rows.append(_row(rid, method, ds, seed, epoch, split, "all", "all", v, checksum=cs))
                        rows += [_row(rid, method, ds, seed, epoch, split, "batch", d, v + (0.01 if i else -0.01),
                                      checksum=cs) for i, d in enumerate(doms)]
                    rows.append(_row(rid, method, ds, seed, epoch, "val", "all", "all", 1.0, metric="loss",
                                     checksum=cs))
                    write_epoch_records(str(root), rid, epoch, rows)
                if sweeps and method.endswith("+tta"):
                    v = value(ds, "test", method, seed, 2)
                    write_epoch_records(str(root), rid, 2, [
                        _row(rid, method, ds, seed, 2, "test", "all", "all", v - 0.05, protocol="batch-size-sweep",
                             ebs=8, checksum=cs)], kind="sweeps")
                if with_done:
                    d = root / "runs" / rid
                    d.mkdir(parents=True, exist_ok=True)
                    trains_as = "erm" if method == "m1" else method  # one training, one duration
                    training_s = 100.0 * (1 + METHODS.index(trains_as)) + 10 * seed
                    (d / "done.json").write_text(json.dumps(done_marker(method, ds, seed, training_s)))
    return str(root)


# A shared training (AdaBN trains as ERM) whose runs select different epochs: ERM's validation peaks at epoch 2,
# AdaBN's at epoch 3. Like the trainer, each run has test records only at the epochs it evaluated its test splits
# at (`test_epochs`: {(method, seed): epochs}; default: its own best-validation and last epoch).
SHARED_VAL = {"erm": {1: 0.40, 2: 0.50, 3: 0.45}, "adabn": {1: 0.40, 2: 0.45, 3: 0.55}}
SHARED_HPARAMS = {"erm": '{"lr":0.001}', "adabn": '{"adapt":"plate","lr":0.001}'}  # adapt: prediction only
SHARED_TRACK = {"erm": "standard", "adabn": "tta"}


def shared_test_value(method: str, seed: int, epoch: int) -> float:
    """Test Total accuracy: erm 0.50 + 0.01·epoch, adabn 0.60 + 0.02·epoch, plus a per-(method, seed) wobble."""
    base = (0.50 + 0.01 * epoch) if method == "erm" else (0.60 + 0.02 * epoch)
    return base + {0: 0.0, 1: 0.004, 2: -0.003}[seed] * (1 if method == "erm" else -1.5)


def write_shared_training(root: Path | str, seeds=(0, 1, 2), test_epochs: dict | None = None) -> str:
    root = Path(root)
    for method in ("erm", "adabn"):
        for seed in seeds:
            rid = run_id(method, "alpha", seed)
            own = test_epochs.get((method, seed)) if test_epochs else None
            own = own or {2 if method == "erm" else 3, 3}
            for epoch in (1, 2, 3):
                where = dict(method=method, track=SHARED_TRACK[method], hparams=SHARED_HPARAMS[method])
                rows = [dict(_row(rid, method, "alpha", seed, epoch, "val", "all", "all",
                                  SHARED_VAL[method][epoch]), **where)]
                if epoch in own:
                    rows.append(dict(_row(rid, method, "alpha", seed, epoch, "test", "all", "all",
                                          shared_test_value(method, seed, epoch)), **where))
                write_epoch_records(str(root), rid, epoch, rows)
    return str(root)
