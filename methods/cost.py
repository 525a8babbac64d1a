"""Per-step training cost of a method: wall time and peak memory, to be compared with ERM's.

`measure_step_cost` builds the method on a synthetic task, feeds it the batches its own
`data_request()` asks for (plate-pure or mixed, controls, several plates per step; built by the
contract kit's `training_batches`), runs `warmup` untimed steps, then times `steps` steps with
time.perf_counter (CUDA synchronised before and after). Peak memory:

* CUDA: torch.cuda.max_memory_allocated over the timed steps, after reset_peak_memory_stats — the
  tensors torch allocated (parameters, optimiser state, activations), not the caching allocator's
  reservations. `memory_measure` = "cuda_max_allocated".
* CPU on Linux: resident set size sampled every millisecond from /proc/self/statm by a thread
  during build, warm-up and timed steps, minus the RSS before the method was built
  (`memory_measure` = "rss_sampled_delta"; approximate: allocator caching and other threads count).
* CPU elsewhere: the growth of resource.getrusage's ru_maxrss, a process-wide high-water mark that
  only moves once the process exceeds its earlier peak ("ru_maxrss_delta"; run in a fresh process).

`platebench perf methods` (harness/perf/methods.py) measures every method and ERM on the same backbone and
batch, each in a fresh process, and prints the ratios.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from .backbones.base import DEFAULT_BACKBONE
from .base import TaskSpec
from .registry import get_method


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Peak RSS over a block, sampled by a background thread (Linux)."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.baseline = _rss_bytes()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_step_cost(method_name: str, backbone: str = DEFAULT_BACKBONE, batch_size: int = 32,
                      image_size: int | tuple[int, int] = 64, steps: int = 5, warmup: int = 2,
                      channels: int = 5, num_classes: int = 8, hparams: Mapping[str, Any] | None = None,
                      device: str | torch.device | None = None, seed: int = 0) -> dict[str, Any]:
    """Mean seconds per training step and peak memory of `method_name` (see the module docstring)."""
    from .testing import training_batches  # the contract kit's batch builder: what the stream would deliver

    if steps < 1 or warmup < 0:
        raise ValueError(f"measure_step_cost: need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = TaskSpec(num_classes=num_classes, channels=channels, image_size=size,
                    num_domains={"plate": 8, "batch": 4, "source": 2, "cell_type": 1})
    cls = get_method(method_name)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        sampler = None
    elif sys.platform.startswith("linux"):
        sampler = _RssSampler()
        sampler.__enter__()
    else:
        sampler, before_rss = None, _max_rss_bytes()
    try:
        torch.manual_seed(seed)
        method = cls(task, {**(hparams or {}), "batch_size": batch_size}, backbone).to(device)
        g = torch.Generator().manual_seed(seed)
        batches = training_batches(method, g)
        batches = [b.to(device) for b in batches] if isinstance(batches, list) else batches.to(device)
        images = sum(len(b) for b in batches) if isinstance(batches, list) else len(batches)
        method.train()
        method.on_epoch_start(0, 1)
        for _ in range(warmup):
            method.training_step(batches)
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            method.training_step(batches)
        if on_cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    if on_cuda:
        peak, measure = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    elif sampler is not None:
        peak, measure = sampler.peak - sampler.baseline, "rss_sampled_delta"
    else:
        peak, measure = _max_rss_bytes() - before_rss, "ru_maxrss_delta"
    return {"method": method_name, "backbone": backbone, "batch_size": batch_size, "image_size": list(size),
            "device": str(device), "steps": steps, "step_seconds": seconds, "images_per_step": images,
            "seconds_per_image": seconds / max(1, images), "peak_mem_bytes": int(peak),
            "memory_measure": measure}

