"""Each method's training-step time and peak memory relative to ERM on the same backbone and batch.

Each method is measured in a fresh process (memory figures on CPU are the growth of resident memory,
meaningless once an allocator has been warmed by another method), via `platebench.methods.cost`.
ABRA is measured perturbing from the first step (`stats_warmup_steps=0`): its cost is the point, and
its extra work stays bounded because the ascent steps reuse the cached res4 features instead of
re-running the backbone. AdvBayes is measured past its ERM warm-up (`pretrain_fraction=0`): every step
runs its adversary.
"""

from __future__ import annotations

import multiprocessing as mp

from platebench.methods.backbones import DEFAULT_BACKBONE
from platebench.methods.registry import names

# Each method measured past its warm-up, where its own extra work runs (ABRA perturbing, AdvBayes' adversary).
COST_HPARAMS = {"abra": {"stats_warmup_steps": 0}, "abra+tta": {"stats_warmup_steps": 0},
                "advbayes": {"pretrain_fraction": 0.0}}


def _measure(args: tuple) -> dict:
    import torch
    from platebench.methods.cost import measure_step_cost

    name, backbone, batch_size, image_size, steps = args
    torch.set_num_threads(1)
    return measure_step_cost(name, backbone=backbone, batch_size=batch_size, image_size=image_size, steps=steps,
                             hparams=COST_HPARAMS.get(name))


def run(methods: list[str] | None = None, backbone: str = DEFAULT_BACKBONE, batch_size: int = 32, image_size: int = 32,
        steps: int = 10) -> tuple[dict, list[dict]]:
    chosen = ["erm"] + [m for m in (methods or names()) if m != "erm"]
    ctx = mp.get_context("spawn")
    results = {}
    for name in chosen:  # one at a time: concurrent measurements would share the cores
        with ctx.Pool(1) as pool:
            results[name] = pool.apply(_measure, ((name, backbone, batch_size, image_size, steps),))
    base = results["erm"]
    rows = []
    for r in results.values():
        r["time_vs_erm"] = r["step_seconds"] / base["step_seconds"]
        r["per_image_vs_erm"] = r["seconds_per_image"] / base["seconds_per_image"]
        r["mem_vs_erm"] = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base["peak_mem_bytes"] > 0 else None
        rows.append(r)
    headline = results.get("abra", rows[-1])
    figures = {"ratio": headline["time_vs_erm"], "headline": "abra step time / erm step time" if "abra" in results
               else f"{rows[-1]['method']} step time / erm step time", "backbone": backbone,
               "batch_size": batch_size, "image_size": image_size, "memory_measure": base["memory_measure"]}
    for r in rows:
        figures[f"{r['method']}_step_vs_erm"] = r["time_vs_erm"]
        figures[f"{r['method']}_per_image_vs_erm"] = r["per_image_vs_erm"]
        figures[f"{r['method']}_mem_vs_erm"] = r["mem_vs_erm"]
    return figures, rows
