"""Plate-context checks and per-plate gradient accumulation (BEN, ARM-BN, CS-ARM-BN, TVN).

BN-statistics methods only mean something when a batch's statistics are one plate's statistics, so
they refuse mixed batches with a message naming the plates. Accumulating one backward per plate
(instead of one graph over all plates of a step) keeps memory at one plate's activations, as the
CS-ARM-BN code does with `acc_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..base import Batch, MethodError


def require_plate_pure(batch: Batch, method: str) -> None:
    ids = batch.domains.get("plate")
    if ids is not None and ids.numel() > 1 and bool((ids != ids[0]).any()):
        raise MethodError(f"method {method!r} needs plate-pure batches (its BN/context statistics are one plate's); "
                          f"got a batch mixing plate ids {sorted(set(ids.tolist()))}")


def require_controls(batch: Batch, method: str, minimum: int, hparam: str) -> None:
    n = int(batch.is_control.sum())
    if n < minimum:
        raise MethodError(f"method {method!r} needs at least {minimum} negative-control rows appended to each batch "
                          f"(is_control=True, see data_request().{hparam}); batch of plate {batch.plate!r} has {n}")


def accumulate_per_plate(optimizer: torch.optim.Optimizer, batches: Sequence[Batch],
                         plate_loss: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]],
                         backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
    """zero_grad, then for each plate batch backward(plate_loss / n_plates); returns the mean of the metrics.

    `backward` is the method's `Method.backward` (it scales the loss under fp16-mixed). The caller then calls
    `Method.optimizer_step(optimizer, None)` (all-reduce, clip, step), so the update is the gradient of the
    mean per-plate loss.
    """
    if not batches:
        raise MethodError("training_step received no batch")
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for batch in batches:
        loss, metrics = plate_loss(batch)
        backward(loss / len(batches))
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / len(batches)
    return totals
