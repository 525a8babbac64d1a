"""Gradient and buffer averaging across ranks with plain torch.distributed (see base.py for why)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def allreduce_gradients(params) -> None:
    """Average .grad of `params` over ranks in one flattened all-reduce (params without grad count as 0)."""
    n = world_size()
    if n == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= n
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def allreduce_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running stats) across ranks."""
    n = world_size()
    if n == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = _flatten_dense_tensors(bufs)
    dist.all_reduce(flat)
    flat /= n
    for b, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
        b.copy_(synced)


def allreduce_mean(value: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def all_gather_objects(local: list) -> list:
    """Concatenate every rank's list (pickled objects; gloo or NCCL). Identical result on every rank."""
    if world_size() == 1:
        return list(local)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (process-group rendezvous, test servers): loopback only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
