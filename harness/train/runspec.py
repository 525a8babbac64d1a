"""A run = (dataset, split scheme, method, hyperparameters, backbone, seed, evaluation protocol, code, and the run
settings precision and compile). Its id is a hash of that canonical JSON (settings at their defaults left out:
run_identity.py): relaunching is idempotent, a finished run is never trained twice, and where
the data lives or how many workers train it does not change the id.

A run's *training* is the part of that identity that shapes the weights: the method it trains as (its own,
or the `trains_as` it declares), its hyperparameters without the prediction-only ones, backbone, seed, the
training method's code and the run settings. Runs with equal trainings (ERM and AdaBN of one seed) are trained once and
evaluated from the same checkpoints; each keeps its own run id, records and MLflow run.

Everything a run needs is validated here, before any training starts: method and hyperparameters,
split scheme, the context the method needs (e.g. negative controls), and the augmentation policy. A run's
hyperparameters are resolved here once, on the driver (`resolve_run_hparams`); its RunSpec carries them and
the workers use them as given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from platebench.datasets.shards import ShardDataset
from platebench.datasets.storage import absolute
from platebench.methods import Method, TaskSpec, get_method
from platebench.methods.backbones.weights import check_weights_file
from platebench.methods.base import resolve_hparams
from platebench.methods.compiling import compile_backbones
from platebench.methods.precision import DEFAULT_PRECISION, check_precision

from ..data.augment import check_policy
from ..data.batching import DomainIndex, on_device
from ..errors import HarnessError
from .code_identity import code_identity, code_label
from .run_identity import digest, run_id_of

# Test batch sizes of the TTA sweep (0 = the whole plate), as in ABRA/CS-ARM-BN's batch-size figures.
DEFAULT_TTA_BATCH_SIZES = (8, 16, 32, 64, 128, 0)
DEFAULT_CONTROL_COUNTS = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class EvalProtocol:
    standard_batch_size: int = 64  # eval-mode predictions do not depend on it; memory only
    tta_batch_sizes: tuple[int, ...] = DEFAULT_TTA_BATCH_SIZES
    control_counts: tuple[int, ...] = DEFAULT_CONTROL_COUNTS

    @classmethod
    def from_dict(cls, d: dict) -> EvalProtocol:
        return cls(standard_batch_size=int(d["standard_batch_size"]), tta_batch_sizes=tuple(d["tta_batch_sizes"]),
                   control_counts=tuple(d["control_counts"]))


@dataclass(frozen=True)
class TrainingSpec:
    """What shapes a run's weights; runs with equal TrainingSpecs share one training."""

    dataset: str
    dataset_checksum: str
    split_scheme: str
    method: str  # the method trained (a run's `trains_as`, else its own method)
    hparams: dict  # its hyperparameters without the prediction-only ones
    backbone: str
    seed: int
    code: dict
    precision: str = DEFAULT_PRECISION  # methods/precision.py
    compile: bool = False  # torch.compile of the backbones (methods/compiling.py)

    @property
    def training_id(self) -> str:
        return f"{self.method.replace('+', '-')}-s{self.seed}-{digest(asdict(self))}"

    def to_dict(self) -> dict:
        return {**asdict(self), "training_id": self.training_id}


@dataclass(frozen=True)
class RunSpec:
    data: str
    dataset: str
    dataset_checksum: str
    split_scheme: str
    method: str
    hparams: dict
    backbone: str
    seed: int
    code: dict  # code_identity(): harness version and source hash
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    precision: str = DEFAULT_PRECISION  # run settings: they change the numbers, so they are part of the id
    compile: bool = False

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("data")  # the same dataset at another address is the same run
        return d

    @property
    def run_id(self) -> str:
        return run_id_of(self.identity())

    @property
    def code_label(self) -> str:
        return code_label(self.code)

    @property
    def hparams_json(self) -> str:
        return json.dumps(self.hparams, sort_keys=True, separators=(",", ":"))

    def training(self) -> TrainingSpec:
        cls = get_method(self.method)
        trainer = get_method(cls.trains_as) if cls.trains_as else cls
        return TrainingSpec(dataset=self.dataset, dataset_checksum=self.dataset_checksum,
                            split_scheme=self.split_scheme, method=trainer.name,
                            hparams=cls.training_hparams(self.hparams), backbone=self.backbone, seed=self.seed,
                            code=code_identity(trainer), precision=self.precision, compile=self.compile)

    def to_dict(self) -> dict:
        return {**asdict(self), "run_id": self.run_id}

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        d = {k: v for k, v in d.items() if k not in ("run_id", "git_commit")}
        d["eval"] = EvalProtocol.from_dict(d["eval"])
        return cls(**d)


def task_spec(ds: ShardDataset) -> TaskSpec:
    m = ds.manifest
    return TaskSpec(num_classes=m.num_classes, channels=len(m.channels), image_size=(m.height, m.width),
                    num_domains=DomainIndex.from_manifest(m).counts())


def resolve_run_hparams(method: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every hyperparameter of `method`: its defaults updated by `overrides`, validated (an error naming the key
    and value). For a method that trains as another, that method must accept the training ones too."""
    cls = get_method(method)  # MethodError with the known names and closest match
    resolved = resolve_hparams(cls, overrides)
    check_policy(resolved["augment"])
    if resolved["weights"]:  # a path as the workers (in other working directories) must see it
        resolved["weights"] = absolute(resolved["weights"])
    if cls.trains_as:  # unknown keys are errors there too
        resolve_hparams(get_method(cls.trains_as), cls.training_hparams(resolved))
    return resolved


def build_specs(ds: ShardDataset, split_scheme: str, method: str, hparams: dict | None, seeds, backbone: str,
                eval_protocol: EvalProtocol | None = None, *, precision: str = DEFAULT_PRECISION,
                compile: bool = False) -> list[RunSpec]:
    """Validate a (dataset, scheme, method, hparams) combination and return one RunSpec per seed."""
    check_precision(precision)
    m = ds.manifest
    scheme = m.scheme(split_scheme)  # DatasetError naming the known schemes
    if "train" not in scheme.splits:
        raise HarnessError(f"split scheme {split_scheme!r} has no 'train' split")
    resolved = resolve_run_hparams(method, hparams)
    if resolved["weights"]:  # a missing, non-safetensors or other backbone's file: one line before Ray starts
        check_weights_file(resolved["weights"], backbone)
    cls = get_method(method)
    if cls.needs.controls and not any(p.controls for p in m.parts):
        raise HarnessError(f"method {method!r} needs negative controls as context, but dataset {m.name!r} "
                           f"({ds.url}) has none")
    if cls.needs.domain_labels and len(m.plates) < 2:
        raise HarnessError(f"method {method!r} needs several domains; dataset {m.name!r} has one plate")
    if not seeds:
        raise HarnessError("no seeds given")
    code = code_identity(cls)
    return [RunSpec(data=ds.url, dataset=m.name, dataset_checksum=m.checksum(), split_scheme=split_scheme,
                    method=method, hparams=resolved, backbone=backbone, seed=int(s), code=code,
                    eval=eval_protocol or EvalProtocol(), precision=precision, compile=bool(compile)) for s in seeds]


def build_method(spec: RunSpec | TrainingSpec, task: TaskSpec, device) -> Method:
    """A fresh instance of the method `spec` names, on `device`, under the spec's run settings: its precision
    (`Method.set_precision`; the loop runs its steps under methods.precision.autocast) and, with `compile`, its
    backbones compiled in place (methods/compiling.py)."""
    method = on_device(get_method(spec.method)(task, spec.hparams, spec.backbone), device)
    method.set_precision(spec.precision)
    if spec.compile:
        compile_backbones(method)
    return method


def check_trainable(ds: ShardDataset, spec: RunSpec, workers: int) -> int:
    """Steps per epoch of the first epoch; an error if the train split cannot fill one batch per rank."""
    from ..data.stream import PlateStream, StreamConfig

    cfg = StreamConfig.for_training(get_method(spec.method).request_for(spec.hparams), spec.split_scheme, spec.seed)
    stream = PlateStream(ds, cfg, rank=0, world=workers)
    steps = stream.steps(0)
    if steps == 0:
        per_plate = sorted(stream.plate_rows.values())
        raise HarnessError(
            f"method {spec.method!r}: the train split of {spec.split_scheme!r} gives no batch of batch_size="
            f"{spec.hparams['batch_size']} with {workers} worker(s) (labelled images per plate: {per_plate[:8]}"
            f"{' ...' if len(per_plate) > 8 else ''}); lower batch_size or use fewer workers")
    return steps
