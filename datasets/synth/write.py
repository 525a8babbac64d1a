"""Write a planned synthetic dataset to any fsspec URL: one plate (for parallel callers) or all, serially.

The Ray job in `platebench.harness.prepare.synth` calls `write_one` from one task per plate; tests and
small scripts call `write_dataset`. Either way the manifest is written last, after every part exists.
"""

from __future__ import annotations

from collections.abc import Callable

from ..manifest import Manifest, Part
from ..shards import write_manifest, write_plate
from ..storage import StorageOptions
from .generate import Plan, PlateSpec, generate_plate, manifest_for


def write_one(plan: Plan, spec: PlateSpec, root: str, options: StorageOptions | None = None) -> list[Part]:
    """Generate one plate and write its part(s). Deterministic: same plan and spec, same bytes."""
    table = generate_plate(plan, spec)
    return write_plate(root, spec.plate, table, image_nbytes=plan.image_nbytes, options=options)


def write_dataset(plan: Plan, root: str, options: StorageOptions | None = None,
                  on_plate: Callable[[PlateSpec, list[Part]], None] | None = None) -> Manifest:
    """Generate and write every plate in this process, then the manifest. Returns the manifest."""
    parts: list[Part] = []
    for spec in plan.plates:
        written = write_one(plan, spec, root, options)
        parts += written
        if on_plate:
            on_plate(spec, written)
    manifest = manifest_for(plan, parts)
    write_manifest(root, manifest, options)
    return manifest
