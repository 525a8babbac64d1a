"""The contract kit (platebench.methods.testing) run against every registered method."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest
from platebench.methods import registry, testing

NAMES = registry.names()
# out of the unit tier: ddp forks two gloo ranks, the others train for several steps (seconds per method)
SLOW_CHECKS = {"ddp", "loss_decreases", "reproducible", "bf16"}


def _method_class(name: str):
    """The registered class; a built-in whose module is not written yet is skipped, any other error fails."""
    eps = {ep.name: ep for ep in entry_points(group=registry.GROUP)}
    module = eps[name].value.split(":")[0] if name in eps else None
    try:
        if module is not None:
            importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            pytest.skip(f"method {name!r}: module {module} does not exist yet")
        raise
    return registry.get_method(name)


# Sizes only, every code path kept: DINO's 65,536-prototype head made its bf16 check a minute of emulated
# bf16 matmuls on CPU; 4,096 prototypes and 2 local crops (its declared options) test the same code. CS-ARM-BN's
# 4 plates of 32 queries + 32 controls a step (256 images) and AdvBayes's 10 adversary steps a step cost 35-40 s of
# emulated bf16 each: 2 plates of 8 + 8 and 2 adversary steps take the same paths.
KIT_SIZES = {"dino": {"out_dim": 4096, "local_crops": 2},
             "cs-arm-bn": {"batch_size": 8, "n_controls": 8, "plates_per_step": 2},
             "advbayes": {"adv_steps": 2}}


@pytest.mark.parametrize("check", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CHECKS else c
                                   for c in testing.CHECKS])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, check):
    testing.CHECKS[check](_method_class(name), KIT_SIZES.get(name))
