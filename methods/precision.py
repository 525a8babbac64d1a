"""Numeric precision of a run: the names, the autocast context, and the float32 guard for delicate blocks.

A run's precision is a run setting (part of its spec and id, harness/train/runspec.py), one of PRECISIONS:

* "fp32" (default): no autocast, every computation in float32, the reference behaviour of every method;
* "bf16-mixed": the harness runs `training_step`, `predict` and `embed` under `torch.autocast(device, bfloat16)`;
* "fp16-mixed": the same with float16, and `Method.optimizer_step` scales each loss with a GradScaler (float16
  gradients underflow without it); bfloat16 has float32's range and needs none.

Parameters, optimiser state and BatchNorm buffers stay float32 under every precision (autocast casts
operands, never weights). Autocast itself already runs the losses (cross_entropy, nll_loss) in float32 on
every device, and softmax / log_softmax in float32 on CUDA: those are not guarded again here. What it would
leave in low precision and the reference code computes in float32 runs under `full_precision`:

* ArcFace's margin (blocks/margins.py `arcface_logits`): InsightFace's arcface_torch computes the cosine
  logits under autocast and casts them to float before the margin, as here;
* the JS consistency term (blocks/divergence.py) and the feature statistics of MixStyle, DSU, AdvStyle and ABRA
  (blocks/style.py statistics and restyling, blocks/batch_style.py `perturb`): the official code computes them in
  float32 (it has no mixed-precision path), and a bfloat16 variance of a feature map keeps 2-3 digits;
* BatchNorm statistics taken from a subset of rows (blocks/bn.py `normalise_with_rows`); torch's own BatchNorm
  computes its statistics in float32 under autocast;
* the CORAL penalty (covariances) and IRM's penalty (a gradient w.r.t. a float32 scale in the DomainBed code).

TVN's whitening is float64 throughout (blocks/tvn.py); autocast never touches float64 tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import MethodError

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
DEFAULT_PRECISION = "fp32"
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_LOW = (torch.float16, torch.bfloat16)

F = TypeVar("F", bound=Callable)


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else an error naming the value."""
    if precision not in PRECISIONS:
        raise MethodError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def device_type(device: torch.device | str) -> str:
    """"cuda" for torch.device("cuda", 0) or "cuda:0", "cpu" for "cpu": what torch.autocast takes."""
    return torch.device(device).type


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a run's method steps, predictions and embeddings run under on `device` (fp32: none)."""
    if check_precision(precision) == DEFAULT_PRECISION:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=_AUTOCAST_DTYPES[precision])


def _autocast_device(values) -> str | None:
    """The device type of the first tensor among `values` when autocast is on there, else None."""
    for value in values:
        if isinstance(value, torch.Tensor):
            kind = value.device.type
            return kind if torch.is_autocast_enabled(kind) else None
    return None


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    return value


def full_precision(fn: F) -> F:
    """Decorator: under autocast, `fn` runs with autocast off and its float16 / bfloat16 tensor arguments cast to
    float32 (float64, integer and bool tensors unchanged); outputs are float32. Without autocast it is a plain call,
    so an fp32 run computes exactly what it did before mixed precision existed."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _autocast_device([*args, *kwargs.values()])
        if device is None:
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*(_to_float32(a) for a in args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return run  # type: ignore[return-value]


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """The loss scaler a method's optimiser steps use: a GradScaler for "fp16-mixed", None otherwise."""
    if check_precision(precision) != "fp16-mixed":
        return None
    return torch.amp.GradScaler(device_type(device))
