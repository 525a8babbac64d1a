"""Inner (adversary / ascent) loops: freeze the parameters that the loop must not update.

BatchNorm contexts (batch statistics without buffer updates, frozen buffers) live in blocks/bn.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


@contextlib.contextmanager
def frozen_parameters(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """requires_grad off for `params` inside the block (no gradient is computed for them), then restored."""
    params = list(params)
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(params, states):
            p.requires_grad_(state)
