"""A run's id from its identity alone (hashlib and json only): `platebench validate` recomputes the id of every
stored spec.json with it, without importing the methods, torch or Ray that building a RunSpec needs."""

from __future__ import annotations

import hashlib
import json

# Keys of a stored spec (RunSpec.to_dict) that are not part of the identity: where the data lived, the id itself,
# and the git commit older specs carried.
NOT_IDENTITY = ("data", "run_id", "git_commit")


def digest(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_id_of(identity: dict) -> str:
    """`<method>-s<seed>-<digest>` of a run identity (RunSpec.identity(), or a stored spec: see NOT_IDENTITY)."""
    identity = {k: v for k, v in identity.items() if k not in NOT_IDENTITY}
    return f"{str(identity['method']).replace('+', '-')}-s{identity['seed']}-{digest(identity)}"
