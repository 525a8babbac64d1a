"""Synthetic Cell Painting plates with controllable batch effects (pure numpy): the default workload."""

from .generate import GENERATOR_VERSION, Plan, PlateSpec, generate_plate, manifest_for, plan
from .presets import CHANNELS, PRESETS, Preset, get_preset, override_keys
from .write import write_dataset, write_one

__all__ = ["CHANNELS", "GENERATOR_VERSION", "PRESETS", "Plan", "PlateSpec", "Preset", "generate_plate",
           "get_preset", "manifest_for", "override_keys", "plan",
           "write_dataset", "write_one"]
