"""Training-step overhead of Ray Train: the same method, batches and loop, in plain PyTorch and in Ray Train.

The headline `ratio` is Ray Train's step time with one worker divided by the plain in-process step
time (the harness's own loop: `Method.training_step`). Also: 2-worker data-parallel throughput over
1-worker throughput (each worker gets its own batches; gloo on CPU, NCCL on GPU), and the fixed cost
of a `fit()` (worker start-up and teardown), which a run pays once.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch


def _timed_steps(cfg: dict, device) -> list[float]:
    from platebench.methods import Batch, TaskSpec, get_method

    torch.manual_seed(cfg["seed"])
    size, b = cfg["image_size"], cfg["batch_size"]
    task = TaskSpec(num_classes=cfg["classes"], channels=cfg["channels"], image_size=(size, size))
    method = get_method(cfg["method"])(task, {"batch_size": b}, cfg["backbone"]).to(device)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    batches = [Batch(torch.randn(b, cfg["channels"], size, size, generator=g),
                     torch.randint(0, cfg["classes"], (b,), generator=g), torch.zeros(b, dtype=torch.bool)).to(device)
               for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        method.training_step(batches[i % len(batches)])
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    return times


def plain(cfg: dict) -> float:
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if cfg["gpu"] else "cpu")
    return statistics.median(_timed_steps(cfg, device))


def _worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(cfg["threads"])
    times = _timed_steps(cfg, ray.train.torch.get_device())
    step = statistics.median(times)
    metrics = {"step_s": step}
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:  # Result.metrics needs a checkpointed report (Train V2)
            with open(os.path.join(d, "perf.json"), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def ray_train(cfg: dict, workers: int, storage: str) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg["threads"], **({"GPU": 1} if cfg["gpu"] else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config=cfg, torch_config=TorchConfig(backend="nccl" if cfg["gpu"] else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg["gpu"], resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"perf-train-{workers}w-{int(time.time())}", storage_path=storage))
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    step = result.metrics["step_s"]
    return {"step_s": step, "fit_wall_s": wall, "loop_s": step * (cfg["warmup"] + cfg["steps"])}


def run(method: str = "erm", backbone: str = "resnet-tiny", image_size: int = 32, batch_size: int = 32,
        channels: int = 5, steps: int = 30, warmup: int = 5, gpu: bool = False, threads: int = 1,
        storage: str | None = None, scaling: bool = True) -> dict:
    cfg = {"method": method, "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
           "channels": channels, "classes": 8, "steps": steps, "warmup": warmup, "gpu": gpu, "threads": threads,
           "seed": 0}
    storage = storage or tempfile.mkdtemp(prefix="pb-perf-train-")
    # Plain PyTorch before and after the Ray run, best of the two: the box is shared and noisy.
    before = plain(cfg)
    one = ray_train(cfg, 1, storage)
    base = min(before, plain(cfg))
    out = {"ratio": one["step_s"] / base, "plain_step_s": base, "ray_train_step_s": one["step_s"],
           "fit_fixed_cost_s": one["fit_wall_s"] - one["loop_s"], "method": method, "backbone": backbone,
           "image_size": image_size, "batch_size": batch_size, "steps": steps, "threads_per_worker": threads,
           "device": "gpu" if gpu else "cpu"}
    if scaling:
        two = ray_train(cfg, 2, storage)
        # Throughput: each of 2 workers processes its own batch per step.
        out["two_worker_step_s"] = two["step_s"]
        out["scaling_2_vs_1"] = (2 * batch_size / two["step_s"]) / (batch_size / one["step_s"])
    return out
