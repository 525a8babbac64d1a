"""What every perf command shares: one flat JSON object with a headline `ratio`, and a printed table."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


def emit(name: str, figures: dict, json_path: str | None) -> dict:
    if "ratio" not in figures:
        raise ValueError(f"perf {name}: figures need a 'ratio'")
    out = {"benchmark": name, **figures, **machine()}
    width = max(len(k) for k in out)
    for key, value in out.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1))
    return out
