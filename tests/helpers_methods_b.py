"""Tiny tasks and batches for the style, ABRA and domain-method tests (5 channels, 16x16, resnet-tiny)."""

from __future__ import annotations

import torch
from platebench.methods import Batch, TaskSpec

TASK = TaskSpec(num_classes=4, channels=5, image_size=(16, 16), num_domains={"plate": 6, "batch": 3, "source": 2})


def plate_batch(plate: int, n: int = 8, seed: int = 0, shift: float = 0.0, n_controls: int = 0) -> Batch:
    """A plate-pure batch; plate p belongs to batch p // 2 and source p % 2. `shift` adds a plate offset."""
    g = torch.Generator().manual_seed(seed * 100 + plate)
    images = torch.randn(n + n_controls, 5, 16, 16, generator=g) + shift * (plate + 1)
    labels = torch.cat([torch.arange(n) % 4, torch.full((n_controls,), -1)])
    is_control = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n_controls, dtype=torch.bool)])
    rows = n + n_controls
    domains = {"plate": torch.full((rows,), plate), "batch": torch.full((rows,), plate // 2),
               "source": torch.full((rows,), plate % 2)}
    return Batch(images=images, labels=labels, is_control=is_control, domains=domains, plate=f"P{plate}")


def plates(*ids: int, n: int = 8, seed: int = 0, shift: float = 0.0) -> list[Batch]:
    return [plate_batch(p, n, seed, shift) for p in ids]


def network_state(module: torch.nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer whose name does not start with one of `exclude`."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(exclude)}


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
