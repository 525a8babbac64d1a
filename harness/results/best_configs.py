"""`best_configs.json`: the configuration a sweep selected for each method, one schema for the writer
(`platebench sweep`) and the reader (`platebench leaderboard`).

    {METHOD: {"hparams": {...}, "trials": N, "value": v, "selection_split": s, "selection_rule": r,
              "experiment": name}, ...}

`hparams` (the full resolved configuration, or its JSON string) and `trials` (how many trials the sweep
spent) are required; the rest says how the choice was made and is optional in files written by hand.
Unknown keys and wrong types are errors naming the method and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import HarnessError

FILE_NAME = "best_configs.json"


@dataclass(frozen=True)
class BestConfig:
    hparams: dict
    trials: int
    value: float | None = None  # the selection split's accuracy at the selected epoch
    selection_split: str | None = None
    selection_rule: str | None = None
    experiment: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_TYPES = {"value": (int, float), "selection_split": str, "selection_rule": str, "experiment": str}


def parse(obj, where: str = FILE_NAME) -> dict[str, BestConfig]:
    if not isinstance(obj, dict):
        raise HarnessError(f"{where}: expected a JSON object {{method: {{\"hparams\": ..., \"trials\": ...}}}}")
    out = {}
    for method, entry in obj.items():
        if not isinstance(entry, dict) or "hparams" not in entry or "trials" not in entry:
            raise HarnessError(f"{where}: method '{method}': expected an object with keys 'hparams' and 'trials'")
        unknown = set(entry) - {"hparams", "trials", *_TYPES}
        if unknown:
            raise HarnessError(f"{where}: method '{method}': unknown key(s) {sorted(unknown)} "
                               f"(allowed: hparams, trials, {', '.join(_TYPES)})")
        hp = entry["hparams"]
        if isinstance(hp, str):
            try:
                hp = json.loads(hp)
            except ValueError:
                raise HarnessError(f"{where}: method '{method}': 'hparams' is not JSON: {hp!r}") from None
        if not isinstance(hp, dict):
            raise HarnessError(f"{where}: method '{method}': 'hparams' must be an object, got {hp!r}")
        trials = entry["trials"]
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise HarnessError(f"{where}: method '{method}': 'trials' must be a positive integer, got {trials!r}")
        for key, typ in _TYPES.items():
            if entry.get(key) is not None and (not isinstance(entry[key], typ) or isinstance(entry[key], bool)):
                raise HarnessError(f"{where}: method '{method}': '{key}' has the wrong type: {entry[key]!r}")
        out[method] = BestConfig(hparams=hp, trials=trials, **{k: entry.get(k) for k in _TYPES})
    return out


def dumps(configs: dict[str, BestConfig]) -> str:
    return json.dumps({m: c.to_dict() for m, c in sorted(configs.items())}, indent=1, sort_keys=True)
