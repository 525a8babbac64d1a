"""How multi-plate and domain-label methods ask for their data and read their groups.

`batch_size` is the number of images of one plate-pure batch for every method (the rows one BN
forward sees, which is what batch-statistics methods are about); a multi-plate method receives
`plates_per_step` such batches per optimisation step, i.e. batch_size * plates_per_step images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Batch, Method, MethodError


def check_plates_per_step(method: Method, minimum: int = 1) -> int:
    hp = method.hparams
    n = hp["plates_per_step"]
    if n < minimum:
        raise MethodError(f"method {method.name!r}: hyperparameter 'plates_per_step' must be >= {minimum}, got {n}")
    if hp["batch_size"] < 2:
        raise MethodError(f"method {method.name!r}: batch_size must be >= 2 images per plate, got {hp['batch_size']}")
    return n


def check_domain_kind(method: Method, need_count: bool) -> str:
    """The method's `domain_kind` hyperparameter, validated (and its domain count present when needed)."""
    kind = method.hparams["domain_kind"]
    known = sorted(method.task.num_domains)  # the kinds the data has (the harness fills them from the manifest)
    if kind not in known:
        raise MethodError(f"method {method.name!r}: hyperparameter 'domain_kind' must be one of {known}, "
                          f"got {kind!r}")
    if need_count and method.task.num_domains.get(kind, 0) < 1:
        raise MethodError(f"method {method.name!r}: TaskSpec.num_domains has no count for domain kind {kind!r} "
                          f"(got {dict(method.task.num_domains)})")
    return kind


def domain_ids(method: Method, batch: Batch, kind: str) -> torch.Tensor:
    """Per-row ids of `kind`; a batch without them is an error naming the kind."""
    if kind not in batch.domains:
        raise MethodError(f"method {method.name!r}: batch has no domain ids of kind {kind!r} "
                          f"(has {sorted(batch.domains)})")
    return batch.domains[kind]


def plate_positions(batches: Sequence[Batch]) -> torch.Tensor:
    """Row → index of its plate-pure batch in the step's list (the groups of a multi-plate step)."""
    return torch.cat([torch.full((len(b),), i, dtype=torch.long, device=b.images.device)
                      for i, b in enumerate(batches)])
