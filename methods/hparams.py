"""Hyperparameters: a default and its valid values, declared together.

A method's `defaults` maps names to plain values or to `Param`s; a `Param` says which values are valid,
and `resolve_hparams` refuses any other (with the name, the value and the valid range), whether it comes
from a command line, a suite, a search space's sample or the default itself. Search spaces are checked
against the same ranges (harness/tune_space.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    default: Any
    choices: tuple | None = None
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False

    def valid(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return not (self.high is not None and (value > self.high or self.high_open and value == self.high))

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}" \
               f"{')' if self.high_open or self.high is None else ']'}"


def default_of(spec: Any) -> Any:
    return spec.default if isinstance(spec, Param) else spec


def param_of(spec: Any) -> Param:
    return spec if isinstance(spec, Param) else Param(spec)


POSITIVE = {"low": 0.0, "low_open": True}
NON_NEGATIVE = {"low": 0.0}

# Hyperparameters every method has. They drive the harness's optimiser, schedule and stream.
COMMON_PARAMS: dict[str, Param] = {
    "lr": Param(1e-3, **POSITIVE),
    "weight_decay": Param(1e-5, **NON_NEGATIVE),
    "optimizer": Param("adam", choices=("adam", "adamw", "sgd")),
    "momentum": Param(0.9, low=0.0, high=1.0, high_open=True),  # sgd only
    "batch_size": Param(32, low=1),  # images of one plate-pure batch
    "epochs": Param(10, low=1),
    "warmup_epochs": Param(0, low=0),  # linear lr warm-up; must be below epochs
    "schedule": Param("cosine", choices=("cosine", "constant")),
    "grad_clip": Param(0.0, **NON_NEGATIVE),  # 0 disables
    "augment": Param("flip-rot90"),  # stream augmentation policy, checked by the harness (harness/augment.py)
    # Input normalisation: each image and channel by its own statistics ("self", the RxRx1/WILDS transform)
    # or every image by the training split's per-channel mean and std ("dataset", the CS-ARM-BN code's).
    "normalize": Param("self", choices=("self", "dataset")),
    # Early stopping on the trained method's overall validation metric: stop after this many epochs
    # without improvement (0: train every epoch). Records end at the stopping epoch.
    "early_stop_patience": Param(0, low=0),
    "early_stop_metric": Param("loss", choices=("loss", "accuracy")),
    # The backbone's initial weights: a safetensors file (path, file:// or s3:// URL; methods/backbones/weights.py),
    # "" = random initialisation. Fine-tuned by every method but tvn, whose encoder stays frozen.
    "weights": Param(""),
}
