"""Which statistics a BatchNorm layer normalises with: the building blocks of AdaBN, BEN, ARM-BN, CS-ARM-BN.

Torch's BatchNorm has two behaviours (train: batch statistics + running-buffer update; eval: running
buffers). The BN-statistics methods need finer control, given here as small composable pieces:

* `batch_stats(module)` — every BN layer normalises with the current forward's batch statistics and
  never touches its running buffers (test-time "train-mode forward" of AdaBN/ARM-BN/CS-ARM-BN).
* `rows_stats(module, rows)` — statistics computed on a subset of rows (e.g. the controls), applied to
  every row.
* `running_stats_from(module, x)` — running buffers reset and filled by one train-mode forward of `x`
  (momentum 0.1 by default), then every row normalised with those buffers in eval mode (the CS-ARM-BN
  code's controls-only "BEN" trainer).
* `forward_per_group(model, x, groups)` — each group of rows (one plate / one ARM chunk) is forwarded
  separately, so its rows are normalised with that group's statistics only.
* `randomize_running_stats(module)` — for tests: proves a forward does not read the running buffers.
* `require_batchnorm(module, method, backbone)` — the BN-statistics methods' refusal of a backbone without BN
  (a ViT): their adaptation would silently be the plain network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MethodError
from ..precision import full_precision

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def require_batchnorm(module: nn.Module, method: str, backbone: str) -> None:
    """One line refusing `method` when `module` (its featurizer) has no BatchNorm layer."""
    if not bn_layers(module):
        raise MethodError(f"method {method!r} adapts BatchNorm statistics, but backbone {backbone!r} has no "
                          f"BatchNorm layer: use a ResNet or DenseNet backbone")


@contextlib.contextmanager
def batch_stats(module: nn.Module) -> Iterator[None]:
    """Every BN layer of `module` uses the statistics of the current forward's batch; buffers stay untouched.

    Works whatever the module's train/eval mode; gradients flow through the statistics, as in train
    mode. Torch's BatchNorm with training=True and track_running_stats=False is exactly "batch
    statistics, no buffer update, no num_batches_tracked increment".
    """
    layers = bn_layers(module)
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (training, track) in zip(layers, saved):
            m.training, m.track_running_stats = training, track


@full_precision  # torch's BatchNorm takes its statistics in float32 under autocast; so do these
def normalise_with_rows(bn: _BatchNorm, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`bn` applied to every row of x with the biased mean/variance of x[rows] (over rows and pixels)."""
    dims = [0, *range(2, x.dim())]
    sub = x[rows]
    if sub.shape[0] == 0:
        raise ValueError("normalise_with_rows: the row mask selects no row")
    mean = sub.mean(dims, keepdim=True)
    var = sub.var(dims, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


@contextlib.contextmanager
def rows_stats(module: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Every BN layer normalises all rows with the statistics of the rows in the bool mask `rows` (dim 0).

    E.g. CS-ARM-BN's controls-only ablation: statistics from the control rows, applied to queries too.
    Running buffers are untouched. The batch dimension must be preserved through `module` (true for
    convolutional backbones).
    """
    rows = rows.bool()
    layers = bn_layers(module)
    saved = [m.__dict__.get("forward") for m in layers]  # an instance-level forward from an outer context
    try:
        for m in layers:
            # Instance attribute shadows the class's forward for this layer only, until restored.
            m.forward = (lambda x, _m=m: normalise_with_rows(_m, x, rows.to(x.device)))
        yield
    finally:
        for m, previous in zip(layers, saved):
            del m.forward
            if previous is not None:
                m.forward = previous


@contextlib.contextmanager
def running_stats_from(module: nn.Module, x: torch.Tensor, momentum: float | None = 0.1) -> Iterator[None]:
    """Inside: `module` in eval mode, each BN layer's running buffers filled from `x` as below; restored on exit.

    Fill: every BN layer's buffers reset (mean 0, var 1), then one train-mode forward of `x` without
    gradient with BN momentum `momentum`, so running_mean = m·μ_x and running_var = (1 − m) + m·σ²_x
    (σ² unbiased; deeper layers see inputs normalised with x's batch statistics), or exactly μ_x and σ²_x
    with momentum None. The forwards inside then normalise every row with these buffers: no gradient
    flows through the statistics and the rows are independent. The module's own buffers, momenta and
    train/eval modes are restored on exit.
    """
    layers = [m for m in bn_layers(module) if m.track_running_stats and m.running_mean is not None]
    modes = [(m, m.training) for m in module.modules()]
    saved = [(m.momentum, m.running_mean, m.running_var, m.num_batches_tracked) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                # Fresh tensors, not an in-place reset: a backward after exit still needs the filled
                # statistics, and the module's own buffers come back untouched.
                m.running_mean = torch.zeros_like(m.running_mean)
                m.running_var = torch.ones_like(m.running_var)
                m.num_batches_tracked = torch.zeros_like(m.num_batches_tracked)
                m.momentum = momentum
            module.train()
            module(x)
        module.eval()
        yield
    finally:
        for m, (value, mean, var, count) in zip(layers, saved):
            m.momentum, m.running_mean, m.running_var, m.num_batches_tracked = value, mean, var, count
        for m, mode in modes:
            m.training = mode


def groups_from_sizes(sizes: Iterable[int], device=None) -> torch.Tensor:
    """Group id per row for consecutive chunks of the given sizes: (2, 3) -> [0, 0, 1, 1, 1]."""
    sizes = torch.as_tensor(list(sizes), device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def forward_per_group(model: nn.Module, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """model(rows of one group) for every group, each under `batch_stats`; outputs back in row order.

    BN statistics are never mixed across groups, so the result equals forwarding each group on its
    own (BEN's plates forwarded separately, ARM-BN's chunked meta-batch).
    """
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"forward_per_group: {groups.shape[0]} group ids for {x.shape[0]} rows")
    index_lists = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
    with batch_stats(model):
        outputs = [model(x[idx]) for idx in index_lists]
    order = torch.argsort(torch.cat(index_lists))
    return torch.cat(outputs)[order]


@torch.no_grad()
def randomize_running_stats(module: nn.Module, generator: torch.Generator | None = None,
                            trainable_only: bool = False) -> int:
    """Overwrite running_mean ~ N(0, 1) and running_var ~ U(0.5, 2.5); returns how many layers were changed.

    `trainable_only` skips BN layers whose affine parameters are frozen (e.g. a frozen encoder's
    statistics belong to the fixed encoder, not to training).
    """
    changed = 0
    for m in bn_layers(module):
        if m.running_mean is None:
            continue
        params = list(m.parameters(recurse=False))
        if trainable_only and params and not any(p.requires_grad for p in params):
            continue
        mean = torch.randn(m.running_mean.shape, generator=generator)
        var = torch.rand(m.running_var.shape, generator=generator) * 2 + 0.5
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(var.to(m.running_var))
        changed += 1
    return changed
