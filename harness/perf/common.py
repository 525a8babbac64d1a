"""What every perf command shares: one flat JSON object with a headline `ratio`, and a printed table."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable

from ..commands.flags import write_json

MACHINE_KEYS = ("benchmark", "cpus", "python", "torch", "gpu", "measured")


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


def emit(name: str, figures: dict, json_path: str | None, keys: Iterable[str] | None = None) -> dict:
    """Print and write `figures` (+ the machine). `keys`: the documented figure keys, which must be exactly these."""
    if "ratio" not in figures:
        raise ValueError(f"perf {name}: figures need a 'ratio'")
    nested = sorted(k for k, v in figures.items() if isinstance(v, (dict, list, tuple, set)))
    if nested:
        raise ValueError(f"perf {name}: figures must be flat; nested values under {nested}")
    if keys is not None and set(figures) != set(keys):
        raise ValueError(f"perf {name}: figures differ from the documented keys (missing "
                         f"{sorted(set(keys) - set(figures))}, undocumented {sorted(set(figures) - set(keys))})")
    out = {"benchmark": name, **figures, **machine()}
    width = max(len(k) for k in out)
    for key, value in out.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if json_path:
        write_json(out, json_path)
    return out
