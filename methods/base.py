"""The method contract (ARCHITECTURE.md, "The method contract").

A method is one `Method` subclass in one file, registered under a name. Its surface is small:
`build()` makes its networks, `training_step(batches)` owns its optimisation (inner loops included)
and returns scalar metrics, `predict(batch)` returns logits for the non-control rows, and
`embed(batch)` returns features. Class-level declarations say what it is: `name`, `track`,
`defaults`, `needs`.

Distributed training: methods do not use DistributedDataParallel, because several of them run
more than one forward/backward per step (ABRA's ascent, AdvStyle's adversary, IRM's halves). Instead
every optimiser step goes through `Method.optimizer_step`, which all-reduces (averages) the
gradients of the parameters it updates when torch.distributed is initialised, so parameters stay
identical on every rank. BatchNorm buffers stay per rank during an epoch (each rank sees its own
plates) and are averaged by `sync_buffers()` before evaluation and checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from . import distributed
from .backbones.base import DEFAULT_BACKBONE
from .errors import MethodError
from .hparams import COMMON_PARAMS, Param, param_of
from .precision import DEFAULT_PRECISION, check_precision, grad_scaler

TRACKS = ("standard", "tta")


@dataclass(frozen=True)
class Needs:
    """What context a method needs from the data stream (declared on the class)."""

    plate_pure: bool = True  # batches hold one plate each (False: mixed-plate batches)
    controls: bool = False  # the plate's negative controls appended as flagged context rows
    multi_plate: bool = False  # several plate-pure batches per step (hparam `plates_per_step`)
    domain_labels: bool = False  # uses Batch.domains (plate/batch/source ids) for its loss

    def describe(self) -> str:
        parts = ["plate-pure batches" if self.plate_pure else "mixed-plate batches"]
        if self.controls:
            parts.append("negative controls")
        if self.multi_plate:
            parts.append("several plates per step")
        if self.domain_labels:
            parts.append("domain labels")
        return ", ".join(parts)


@dataclass(frozen=True)
class BatchShape:
    """How a stream groups a split's rows into batches. The one definition of these settings: a method's
    DataRequest is one, and the harness's stream settings and re-batcher hold one."""

    batch_size: int  # query rows per batch; 0 = a whole plate in one batch (evaluation only)
    plate_pure: bool = True  # every batch from one plate (False: mixed-plate batches, training only)
    n_controls: int = 0  # the plate's negative-control rows appended to each batch as context
    plates_per_step: int = 1  # plate-pure batches from this many distinct plates handed over together


@dataclass(frozen=True)
class DataRequest(BatchShape):
    """What the stream must deliver for a method: derived once, by `Method.request_for`, from its `needs` and
    the hyperparameters with the conventional names (`batch_size`; `n_controls` and `eval_n_controls` with
    Needs(controls=True); `plates_per_step` with Needs(multi_plate=True)). Its BatchShape fields shape the
    training batches; the two below shape a tta method's main test batches."""

    eval_n_controls: int = 0  # control rows appended to each evaluation batch
    eval_batch_size: int | None = None  # tta methods' main test batch size (None: batch_size; 0: whole plate)

    def training_shape(self) -> BatchShape:
        """The training batches' shape (this request's BatchShape fields, without the evaluation ones)."""
        return BatchShape(**{f.name: getattr(self, f.name) for f in fields(BatchShape)})

    def evaluation_shape(self) -> BatchShape:
        """A tta method's main test batches: plate-pure, `eval_batch_size` rows (None: `batch_size`) with
        `eval_n_controls` controls."""
        size = self.batch_size if self.eval_batch_size is None else self.eval_batch_size
        return BatchShape(size, n_controls=self.eval_n_controls)


@dataclass(frozen=True)
class TaskSpec:
    """The prediction problem: classes, channels and image size, plus how many domains exist."""

    num_classes: int
    channels: int
    image_size: tuple[int, int] = (32, 32)
    num_domains: Mapping[str, int] = field(default_factory=dict)  # e.g. {"plate": 24, "batch": 6, "source": 2}


@dataclass
class Batch:
    """One mini-batch. Images are float32 [B, C, H, W], self-standardised per image and channel.

    `labels` is -1 for rows without a class (e.g. negative controls). `domains[kind]` holds per-row
    integer ids for kind in plate/batch/source/cell_type. For a plate-pure batch `plate` names the
    plate and `meta` holds its batch, source and cell type.
    """

    images: torch.Tensor
    labels: torch.Tensor
    is_control: torch.Tensor
    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    plate: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image_ids: Sequence[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def queries(self) -> torch.Tensor:
        """Mask of rows to predict (everything but control context)."""
        return ~self.is_control

    def to(self, device) -> Batch:
        return replace(self, images=self.images.to(device, non_blocking=True), labels=self.labels.to(device),
                       is_control=self.is_control.to(device),
                       domains={k: v.to(device) for k, v in self.domains.items()})

    def select(self, mask: torch.Tensor) -> Batch:
        ids = None if self.image_ids is None else [i for i, m in zip(self.image_ids, mask.tolist()) if m]
        return replace(self, images=self.images[mask], labels=self.labels[mask], is_control=self.is_control[mask],
                       domains={k: v[mask] for k, v in self.domains.items()}, image_ids=ids)

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        if len(batches) == 1:
            return batches[0]
        keys = set.intersection(*(set(b.domains) for b in batches))
        plates = {b.plate for b in batches}
        return Batch(images=torch.cat([b.images for b in batches]), labels=torch.cat([b.labels for b in batches]),
                     is_control=torch.cat([b.is_control for b in batches]),
                     domains={k: torch.cat([b.domains[k] for b in batches]) for k in keys},
                     plate=plates.pop() if len(plates) == 1 else None)


def as_list(batches: Batch | Sequence[Batch]) -> list[Batch]:
    return [batches] if isinstance(batches, Batch) else list(batches)


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
COMMON_DEFAULTS: dict[str, Any] = {k: p.default for k, p in COMMON_PARAMS.items()}


def resolve_hparams(cls: type, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of `cls` (common + its own) updated by `overrides`. Unknown keys are errors.

    Values are coerced to the type of the default (so CLI strings such as "0.1" work); a value that
    cannot be coerced, or lies outside its declared range (`Param`), is an error naming the key and value.
    """
    specs = cls.param_specs()
    out = {k: p.default for k, p in specs.items()}
    for key, value in (overrides or {}).items():
        if key not in specs:
            import difflib

            close = difflib.get_close_matches(key, list(specs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MethodError(f"method {cls.name!r}: unknown hyperparameter {key!r}{hint} "
                              f"(known: {', '.join(sorted(specs))})")
        out[key] = _coerce(cls.name, key, value, specs[key].default)
    for key, value in out.items():
        if not specs[key].valid(value):
            raise MethodError(f"method {cls.name!r}: hyperparameter {key!r} must be {specs[key].describe()}, "
                              f"got {value!r}")
    if out["warmup_epochs"] >= out["epochs"] and out["warmup_epochs"]:
        raise MethodError(f"method {cls.name!r}: hyperparameter 'warmup_epochs' must be below epochs "
                          f"({out['epochs']}), got {out['warmup_epochs']}")
    return out


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes"):
                    return True
                if value.lower() in ("0", "false", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            return int(as_float)
        if isinstance(default, float):
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise MethodError(f"method {method!r}: hyperparameter {key!r} needs a {type(default).__name__}, "
                          f"got {value!r}") from None
    return value


class Method(nn.Module):
    """Base class of every method. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str] = ""
    track: ClassVar[str] = "standard"
    needs: ClassVar[Needs] = Needs()
    defaults: ClassVar[dict[str, Any]] = {}
    summary: ClassVar[str] = ""
    # Shared trainings: a method whose training is exactly another registered method's and which differs
    # only in how it predicts names that method here (AdaBN trains as ERM). `predict_hparams` are the
    # hyperparameters that change prediction only; the rest must be hyperparameters of `trains_as`.
    # The harness then trains once and evaluates both from the same checkpoints; the contract kit checks
    # the claim (identical weights after a few steps from the same seed).
    trains_as: ClassVar[str | None] = None
    predict_hparams: ClassVar[frozenset[str]] = frozenset()
    # The published search space of an out-of-tree method, shipped with its package (a YAML path); built-in
    # methods' spaces are platebench/tune_spaces/<name>.yaml.
    search_space: ClassVar[str | None] = None

    def __init__(self, task: TaskSpec, hparams: Mapping[str, Any] | None = None, backbone: str = DEFAULT_BACKBONE):
        super().__init__()
        if self.track not in TRACKS:
            raise MethodError(f"method {self.name!r}: track must be one of {TRACKS}")
        self.task = task
        self.backbone_spec = backbone
        self.epoch, self.total_epochs, self.steps_per_epoch = 0, 0, 0  # set by on_epoch_start
        self.precision, self._grad_scaler = DEFAULT_PRECISION, None  # set_precision
        self.hparams = resolve_hparams(type(self), hparams)
        self.build()
        self._optimizers = self.configure_optimizers()
        for opt in self._optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    # ---- hooks a method implements --------------------------------------------------------
    def build(self) -> None:
        """Create networks from self.task, self.hparams and self.backbone_spec."""
        raise NotImplementedError

    def training_step(self, batches: Batch | Sequence[Batch]) -> dict[str, float]:
        """One optimisation step (the method owns inner loops). Returns scalar metrics, incl. 'loss'."""
        raise NotImplementedError

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits [n_queries, num_classes] for the non-control rows of `batch`."""
        raise NotImplementedError

    def embed(self, batch: Batch) -> torch.Tensor:
        """Features [B, D] for every row of `batch` (controls included), with the same test-time rules as
        `predict`. Default: the featurizer of `self.network` in the module's current mode; override when
        prediction uses test-time statistics or the method has no `network`."""
        network = getattr(self, "network", None)
        if network is None or not hasattr(network, "embed"):
            raise NotImplementedError(f"method {self.name!r} has no `network`: override embed()")
        return network.embed(batch.images)

    @classmethod
    def request_for(cls, hparams: Mapping[str, Any]) -> DataRequest:
        """What the stream must deliver for these (resolved) hyperparameters; see DataRequest."""
        controls, multi = cls.needs.controls, cls.needs.multi_plate
        return DataRequest(batch_size=hparams["batch_size"], plate_pure=cls.needs.plate_pure,
                           n_controls=hparams.get("n_controls", 0) if controls else 0,
                           eval_n_controls=hparams.get("eval_n_controls", 0) if controls else 0,
                           plates_per_step=hparams.get("plates_per_step", 1) if multi else 1)

    def data_request(self) -> DataRequest:
        return self.request_for(self.hparams)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser over all parameters by default; methods with adversaries return several."""
        return [self.make_optimizer(self.parameters())]

    # ---- services for subclasses and the harness ---------------------------------------------
    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        hp = self.hparams
        kw: dict[str, Any] = {"lr": hp["lr"] if lr is None else lr, "weight_decay": hp["weight_decay"]}
        if hp["optimizer"] == "sgd":
            kw["momentum"] = hp["momentum"]
        return _OPTIMIZERS[hp["optimizer"]]([p for p in params if p.requires_grad], **kw)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._optimizers

    def set_precision(self, precision: str) -> None:
        """The run's precision (methods/precision.py), set by the harness once the method is on its device. The
        harness runs the steps under its autocast; here it only decides the loss scaling of "fp16-mixed"."""
        device = next(self.parameters(), torch.empty(0)).device
        self.precision, self._grad_scaler = check_precision(precision), grad_scaler(precision, device)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, scaled under "fp16-mixed": how a method that accumulates gradients itself before
        `optimizer_step(optimizer, None)` backpropagates.

        Outside autocast, as torch's AMP recipe has it: each backward op then runs in its forward op's dtype. On
        CPU the backward runs in the calling thread, where the harness's autocast would otherwise recast the
        backward of float32-guarded blocks (methods/precision.py) to low precision (and bf16 matmuls are slow)."""
        with torch.autocast(loss.device.type, enabled=False):
            (loss if self._grad_scaler is None else self._grad_scaler.scale(loss)).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None) -> None:
        """zero_grad → backward → average gradients across ranks → clip → step.

        `loss=None`: the caller already accumulated .grad itself with `self.backward` (zero_grad, then one
        backward per plate, as CS-ARM-BN's gradient accumulation does); only the all-reduce, clip and step run.

        Under "fp16-mixed" the backward is scaled (GradScaler), and the gradients are unscaled after the
        all-reduce, so every rank sees the same non-finite values and skips the same steps, and before the clip.
        The scale is updated after every optimiser step rather than once per training step: methods step one
        optimiser several times per training step (ABRA's ascent, AdvStyle's adversary), a GradScaler allows
        one unscale per optimiser between updates, and each backward is scaled just before its own step.
        """
        if loss is not None:
            optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        distributed.allreduce_gradients(params)
        scaler = self._grad_scaler
        if scaler is not None and all(p.grad is None for p in params):
            scaler = None  # no gradient at all (an adversary step whose layers all drew other branches): no-op step
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.hparams["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, self.hparams["grad_clip"])
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped when a gradient is inf/NaN
            scaler.update()

    def set_lr_factor(self, factor: float) -> None:
        """Scale every optimiser's learning rate relative to its initial value (the harness's schedule)."""
        for opt in self._optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BN running statistics) across ranks."""
        distributed.allreduce_buffers(self)

    def on_epoch_start(self, epoch: int, total_epochs: int, steps_per_epoch: int = 0) -> None:
        """Called by the harness before each training epoch with the epoch's exact number of optimiser steps
        (0 when unknown), for schedules such as DANN's λ."""
        self.epoch, self.total_epochs, self.steps_per_epoch = epoch, total_epochs, steps_per_epoch

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint (override with `load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"model": self.state_dict(), "optimizers": [o.state_dict() for o in self._optimizers],
                 "extra": self.extra_state()}
        if self._grad_scaler is not None:  # fp16-mixed: the loss scale and its growth counter (plain numbers)
            state["grad_scaler"] = self._grad_scaler.state_dict()
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for opt, s in zip(self._optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.load_extra_state(state.get("extra", {}))
        if self._grad_scaler is not None and "grad_scaler" in state:
            self._grad_scaler.load_state_dict(state["grad_scaler"])

    @classmethod
    def training_hparams(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved hyperparameters that shape training (everything but `predict_hparams`)."""
        return {k: v for k, v in hparams.items() if k not in cls.predict_hparams}

    @classmethod
    def param_specs(cls) -> dict[str, Param]:
        """Every hyperparameter (common and the method's own) with its valid values."""
        return {**COMMON_PARAMS, **{k: param_of(v) for k, v in cls.defaults.items()}}

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        return {k: p.default for k, p in cls.param_specs().items()}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"name": cls.name, "track": cls.track, "needs": cls.needs.describe(),
                "summary": cls.summary, "hparams": cls.all_defaults(), "trains_as": cls.trains_as,
                "predict_hparams": sorted(cls.predict_hparams)}


def queries_with_labels(batch: Batch) -> torch.Tensor:
    """Mask of rows that carry a class label and are not controls (the rows a loss uses)."""
    return batch.queries & (batch.labels >= 0)

