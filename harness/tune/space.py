"""Published search spaces: `tune_spaces/<method>.yaml`, parsed strictly.

    method: abra
    description: free text
    params:
      step_size: {distribution: loguniform, low: 0.01, high: 1.0, default: 0.1}
      ascent_steps: {distribution: int, low: 1, high: 5, default: 1}
      arcface_scale: {distribution: choice, values: [16, 30, 64], default: 30}
    datasets:            # optional per-dataset overrides, keyed by manifest name
      rxrx1-wilds:
        params: {lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3, default: 1.0e-3}}

Every parameter must be a hyperparameter of the method; unknown keys, empty ranges and defaults
outside their range are errors naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config_files import load_yaml
from ..errors import HarnessError

DISTRIBUTIONS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high"),
                 "choice": ("values",)}
_TOP = {"method", "description", "params", "datasets"}


def spaces_dir() -> Path:
    # tune_spaces/ sits beside harness/ both in a checkout (editable install) and in a wheel (platebench/).
    return Path(__file__).resolve().parents[2] / "tune_spaces"


@dataclass(frozen=True)
class Param:
    name: str
    distribution: str
    default: Any
    low: float | None = None
    high: float | None = None
    values: tuple | None = None

    def to_tune(self):
        from ray import tune

        makers = {"uniform": lambda: tune.uniform(self.low, self.high),
                  "loguniform": lambda: tune.loguniform(self.low, self.high),
                  "int": lambda: tune.randint(int(self.low), int(self.high) + 1),  # inclusive high
                  "choice": lambda: tune.choice(list(self.values))}
        return makers[self.distribution]()


@dataclass(frozen=True)
class SearchSpace:
    method: str
    source: str
    params: dict[str, Param]

    def defaults(self) -> dict:
        return {k: p.default for k, p in self.params.items()}

    def to_tune(self) -> dict:
        return {k: p.to_tune() for k, p in self.params.items()}

    def digest(self) -> str:
        blob = json.dumps({k: asdict(p) for k, p in sorted(self.params.items())}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise HarnessError(f"{where}: params.{name} must be a mapping")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise HarnessError(f"{where}: params.{name}.distribution must be one of {sorted(DISTRIBUTIONS)}, got {dist!r}")
    allowed = {"distribution", "default", *DISTRIBUTIONS[dist]}
    unknown = set(spec) - allowed
    if unknown:
        raise HarnessError(f"{where}: params.{name}: unknown key(s) {sorted(unknown)} for a {dist} distribution")
    missing = allowed - set(spec)
    if missing:
        raise HarnessError(f"{where}: params.{name}: missing key(s) {sorted(missing)}")
    default = spec["default"]
    if dist == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise HarnessError(f"{where}: params.{name}.values: empty choice")
        if default not in values:
            raise HarnessError(f"{where}: params.{name}.default {default!r} is not one of its values {values}")
        return Param(name, dist, default, values=tuple(values))
    try:
        low, high, default = float(spec["low"]), float(spec["high"]), float(default)
    except (TypeError, ValueError):
        raise HarnessError(f"{where}: params.{name}: low, high and default must be numbers") from None
    if not low < high:
        raise HarnessError(f"{where}: params.{name}: empty range (low {low} must be below high {high})")
    if dist == "loguniform" and low <= 0:
        raise HarnessError(f"{where}: params.{name}: loguniform needs low > 0, got {low}")
    if dist == "int":
        if low != math.floor(low) or high != math.floor(high) or default != math.floor(default):
            raise HarnessError(f"{where}: params.{name}: int distribution needs integer low/high/default")
        default = int(default)
    if not low <= default <= high:
        raise HarnessError(f"{where}: params.{name}.default {default} is outside [{low}, {high}]")
    return Param(name, dist, default, low=low, high=high)


def parse(data: Any, where: str, dataset: str | None = None) -> SearchSpace:
    if not isinstance(data, dict):
        raise HarnessError(f"{where}: a search space is a mapping")
    unknown = set(data) - _TOP
    if unknown:
        raise HarnessError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_TOP)})")
    if "method" not in data or "params" not in data:
        raise HarnessError(f"{where}: needs 'method' and 'params'")
    params = dict(data["params"] or {})
    overrides = data.get("datasets") or {}
    if not isinstance(overrides, dict):
        raise HarnessError(f"{where}: datasets must map dataset names to overrides")
    for ds_name, block in overrides.items():
        if not isinstance(block, dict) or set(block) - {"params"}:
            raise HarnessError(f"{where}: datasets.{ds_name}: only 'params' may be overridden")
        for name, spec in (block.get("params") or {}).items():
            _param(name, spec, f"{where} (datasets.{ds_name})")  # validate every override, used or not
        if ds_name == dataset:
            params.update(block.get("params") or {})
    parsed = {name: _param(name, spec, where) for name, spec in params.items()}
    if not parsed:
        raise HarnessError(f"{where}: no params")
    _check_method_params(str(data["method"]), parsed, where)
    return SearchSpace(method=str(data["method"]), source=where, params=parsed)


def _check_method_params(method: str, params: dict[str, Param], where: str) -> None:
    from platebench.methods import get_method

    specs = get_method(method).param_specs()
    bad = sorted(set(params) - set(specs))
    if bad:
        raise HarnessError(f"{where}: {bad} are not hyperparameters of method {method!r}")
    for name, p in params.items():
        spec = specs[name]
        values = p.values if p.distribution == "choice" else (p.low, p.high)
        outside = [v for v in values if not spec.valid(v)]
        if outside:
            raise HarnessError(f"{where}: params.{name}: {outside[0]!r} is not a valid value of {method!r}'s "
                               f"{name} ({spec.describe()})")


def load(path: str | Path, dataset: str | None = None) -> SearchSpace:
    return parse(load_yaml(path, "search space file"), str(path), dataset)


def for_method(method: str, dataset: str | None = None, path: str | None = None) -> SearchSpace:
    """The space to search for `method`: `path` if given, else the one its class ships (`search_space`, for
    methods installed from other packages), else platebench's published `tune_spaces/<method>.yaml`."""
    from platebench.methods import get_method

    shipped = get_method(method).search_space
    file = Path(path) if path else Path(shipped) if shipped else spaces_dir() / f"{method}.yaml"
    space = load(file, dataset)
    if space.method != method:
        raise HarnessError(f"{file}: is the space of {space.method!r}, not {method!r}")
    return space
