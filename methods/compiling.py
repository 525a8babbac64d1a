"""A run's `compile` setting: torch.compile of a method's backbones, in place.

`nn.Module.compile()` compiles the module's forward and keeps the module object itself (no wrapper module,
no `_orig_mod.` key prefix), so state_dict names, checkpoints and the method's own code stay as they are: a
compiled run's weights load into an eager instance and back. Only Backbone modules are compiled: their forward
(stem, stages, the style layers set at insertion points, pooling) is nearly all of a step's work. Heads,
losses and the methods' own code stay eager; a method that calls a backbone's stages one by one instead of its
forward (ABRA's trunk and head during training) runs them eagerly. Compilation happens at the first forward
(a C++ compiler is needed on CPU) and again when a guard fails, e.g. a BN-statistics context switching a
layer's mode.
"""

from __future__ import annotations

from torch import nn

from .backbones.base import Backbone


def compile_backbones(module: nn.Module) -> int:
    """Compile every Backbone inside `module` (a Method) in place; returns how many."""
    backbones = [m for m in module.modules() if isinstance(m, Backbone)]
    for backbone in backbones:
        backbone.compile()
    return len(backbones)
