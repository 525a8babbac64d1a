"""One hyperparameter configuration per (dataset, split scheme, method, track), chosen from the selected
results (harness/results/selection.py): the one a sweep named in best_configs.json, else the only one run, else the
best mean selected-validation accuracy over its seeds. Seeds of different configurations are never mixed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from ..errors import HarnessError
from .best_configs import BestConfig
from .vocabulary import is_main_overall


@dataclass(frozen=True)
class ConfigChoice:
    hparams: str  # the records' canonical JSON of the chosen config
    rule: str  # "only-config" | "best-configs" | "best-mean-val"
    n_configs: int
    val_mean: float | None  # mean selected validation accuracy over the chosen config's seeds
    trials: int | None  # sweep trials spent on the method (from best_configs), when known

    def to_dict(self) -> dict:
        return {"hparams": json.loads(self.hparams), "rule": self.rule, "n_configs": self.n_configs,
                "val_mean": self.val_mean, "trials": self.trials}


def choose_configs(selected: pa.Table, best_configs: Mapping[str, BestConfig] | None = None
                   ) -> dict[tuple[str, str, str, str], ConfigChoice]:
    """One hparams config per (dataset, split_scheme, method, track). With `best_configs` (a parsed
    best_configs.json, harness/results/best_configs.py) a listed method uses that config; otherwise the config with the
    best mean selected-validation accuracy over its seeds wins (ties: more seeds, then the smaller JSON string)."""
    best = dict(best_configs or {})
    # val score of each run at its selected epoch
    val: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    configs: dict[tuple, set[str]] = defaultdict(set)
    for r in selected.to_pylist():
        key = (r["dataset"], r["split_scheme"], r["method"], r["track"])
        configs[key].add(r["hparams"])
        if r["split_role"] == "val" and is_main_overall(r, metric=None):  # selected rows: accuracies only
            val[key][r["hparams"]][r["seed"]] = r["value"]
    unused = set(best) - {k[2] for k in configs}
    if unused:
        raise HarnessError(f"best_configs: method(s) {sorted(unused)} have no records")
    choices = {}
    for key, hps in configs.items():
        method = key[2]
        if method in best:
            want = best[method].hparams
            match = [h for h in hps if json.loads(h) == want]
            if not match:
                raise HarnessError(f"best_configs: method '{method}': config {json.dumps(want, sort_keys=True)} has no "
                                   f"records in {key[0]}/{key[1]} ({len(hps)} config(s) recorded)")
            h = match[0]
            scores = val[key].get(h, {})
            vm = sum(scores.values()) / len(scores) if scores else None
            choices[key] = ConfigChoice(h, "best-configs", len(hps), vm, best[method].trials)
            continue
        scored = {h: s for h, s in val[key].items()}
        if len(hps) == 1:
            h = next(iter(hps))
            s = scored.get(h, {})
            choices[key] = ConfigChoice(h, "only-config", 1, sum(s.values()) / len(s) if s else None, None)
            continue
        missing = hps - set(scored)
        if missing:
            raise HarnessError(f"{key[0]}/{key[1]} method '{method}' ({key[3]}): {len(hps)} hparams configs but "
                               f"{len(missing)} without validation accuracy; pass --best-configs to choose one")
        h = max(scored, key=lambda h: (sum(scored[h].values()) / len(scored[h]), len(scored[h]), _neg(h)))
        vm = sum(scored[h].values()) / len(scored[h])
        choices[key] = ConfigChoice(h, "best-mean-val", len(hps), vm, None)
    return choices


def _neg(s: str) -> tuple:
    # Sort key that prefers the lexicographically smaller string under max().
    return tuple(-ord(c) for c in s) + (1,)
