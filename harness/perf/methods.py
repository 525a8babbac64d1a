"""Each method's training-step time and peak memory relative to ERM on the same backbone and batch.

Delegates to `platebench.methods.cost` (pure PyTorch). ABRA's extra cost stays bounded because its
ascent steps reuse the cached res4 features instead of re-running the backbone.
"""

from __future__ import annotations

from platebench.methods.cost import compare_to_erm
from platebench.methods.registry import names


def run(methods: list[str] | None = None, backbone: str = "resnet-tiny", batch_size: int = 32, image_size: int = 32,
        steps: int = 10) -> tuple[dict, list[dict]]:
    chosen = methods or names()
    table = compare_to_erm(chosen, backbone=backbone, batch_size=batch_size, image_size=image_size, steps=steps)
    rows = [{"method": k, **v} for k, v in table.items()]
    headline = table.get("abra", next(iter(table.values())))
    figures = {"ratio": headline["time_vs_erm"], "headline": "abra step time / erm step time" if "abra" in table
               else "first method / erm", "backbone": backbone, "batch_size": batch_size, "image_size": image_size}
    for r in rows:
        figures[f"{r['method']}_step_vs_erm"] = r["time_vs_erm"]
        figures[f"{r['method']}_per_image_vs_erm"] = r["per_image_vs_erm"]
        figures[f"{r['method']}_mem_vs_erm"] = r["mem_vs_erm"]
    return figures, rows
