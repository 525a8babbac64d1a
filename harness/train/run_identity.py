"""A run's id from its identity alone (hashlib and json only): `platebench validate` recomputes the id of every
stored spec.json with it, without importing the methods, torch or Ray that building a RunSpec needs."""

from __future__ import annotations

import hashlib
import json

# Keys of a stored spec (RunSpec.to_dict) that are not part of the identity: where the data lived, the id itself,
# and the git commit older specs carried.
NOT_IDENTITY = ("data", "run_id", "git_commit")
# Run settings added after runs were first stored (precision: methods/precision.py, compile: methods/compiling.py),
# at their defaults. A setting at its default is left out of the hash, so a spec stored before the setting existed
# and the same spec written with it have one id; any other value changes the id (it changes the numbers).
SETTING_DEFAULTS = {"precision": "fp32", "compile": False}


def digest(identity: dict) -> str:
    """Hash of an identity (a run's or a training's), its settings at their defaults left out."""
    identity = {k: v for k, v in identity.items() if k not in SETTING_DEFAULTS or v != SETTING_DEFAULTS[k]}
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_id_of(identity: dict) -> str:
    """`<method>-s<seed>-<digest>` of a run identity (RunSpec.identity(), or a stored spec: see NOT_IDENTITY)."""
    identity = {k: v for k, v in identity.items() if k not in NOT_IDENTITY}
    return f"{str(identity['method']).replace('+', '-')}-s{identity['seed']}-{digest(identity)}"
