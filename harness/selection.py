"""Model selection over run records: which epoch of each run, and which hyperparameter config of each
method, the leaderboard reports. Pure functions of a records `pyarrow.Table` (harness.records schema).

Rules (DomainBed's lesson: select after training from fine-grained records, never from a test split):
- "val": the epoch with the best overall accuracy on the scheme's selection split (split_role "val",
  domain_kind "all", protocol "main"); ties go to the earliest epoch.
- "last-epoch": the last epoch with a val or test evaluation; compares no accuracies.
- "oracle": the best epoch *on the split being reported* (DomainBed's test-domain oracle). It reads
  test splits, so it is an upper bound for analysis and NOT valid for a leaderboard.

A run here is (run_id, track): if one training run is evaluated on both tracks, each track selects its
own epoch from its own validation numbers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .errors import HarnessError

RULES = ("val", "last-epoch", "oracle")
LEADERBOARD_RULES = ("val", "last-epoch")
MAIN = "main"
PROTOCOLS = ("main", "batch-size-sweep", "controls-sweep")
TRACKS = ("standard", "tta")
ROLES = ("train", "val", "test")
DOMAIN_KINDS = ("all", "plate", "batch", "source", "cell_type")
METRICS = ("accuracy", "loss")
RUN_FIELDS = ("dataset", "dataset_checksum", "split_scheme", "method", "seed", "hparams", "code")

SELECTED_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("dataset", pa.string()), ("dataset_checksum", pa.string()),
    ("split_scheme", pa.string()), ("method", pa.string()), ("track", pa.string()), ("seed", pa.int64()),
    ("hparams", pa.string()), ("code", pa.string()),
    ("selection_rule", pa.string()), ("selection_split", pa.string()), ("epoch", pa.int64()),
    ("split", pa.string()), ("split_role", pa.string()), ("domain_kind", pa.string()), ("domain", pa.string()),
    ("protocol", pa.string()), ("eval_batch_size", pa.int64()), ("n_controls", pa.int64()),
    ("value", pa.float64()), ("n", pa.int64()),
])


@dataclass(frozen=True)
class Selection:
    epoch: int
    rule: str
    split: str | None  # the split whose accuracy chose the epoch; None for "last-epoch"
    value: float | None  # that accuracy at the chosen epoch

    @property
    def for_leaderboard(self) -> bool:
        return self.rule in LEADERBOARD_RULES


def _rows(table: pa.Table | Iterable[Mapping]) -> list[dict]:
    return table.to_pylist() if isinstance(table, pa.Table) else [dict(r) for r in table]


def validate(records: pa.Table) -> None:
    """Refuse records the tables would misread: unknown vocabulary, bad epochs, and run ids whose
    identity (dataset, checksum, scheme, method, seed, hparams, version) is not constant."""
    checks = [("track", TRACKS), ("split_role", ROLES), ("domain_kind", DOMAIN_KINDS),
              ("protocol", PROTOCOLS), ("metric", METRICS)]
    for field, allowed in checks:
        seen = set(pc.unique(records.column(field)).to_pylist())
        bad = seen - set(allowed)
        if bad:
            raise HarnessError(f"records: field '{field}' has unknown value(s) {sorted(map(str, bad))} "
                               f"(allowed: {', '.join(allowed)})")
    for name in records.column_names:
        if records.column(name).null_count:
            raise HarnessError(f"records: field '{name}' has {records.column(name).null_count} empty (null) value(s)")
    if len(records) and not pc.all(pc.is_finite(records.column("value"))).as_py():
        r = records.filter(pc.invert(pc.is_finite(records.column("value")))).slice(0, 1).to_pylist()[0]
        raise HarnessError(f"records: run {r['run_id']} epoch {r['epoch']} split '{r['split']}': field 'value' is "
                           f"{r['value']} (values must be finite)")
    if len(records) and pc.min(records.column("epoch")).as_py() < 1:
        raise HarnessError("records: field 'epoch' must be >= 1 (epochs are 1-based)")
    kind_all = pc.equal(records.column("domain_kind"), "all")
    bad_domain = pc.not_equal(kind_all, pc.equal(records.column("domain"), "all"))
    if len(records) and pc.any(bad_domain).as_py():
        r = records.filter(bad_domain).slice(0, 1).to_pylist()[0]
        raise HarnessError(f"records: run {r['run_id']}: domain '{r['domain']}' with domain_kind "
                           f"'{r['domain_kind']}' (domain is 'all' exactly when domain_kind is 'all')")
    # distinct (run_id, identity) combinations: more than one per run_id means a malformed run
    combos = records.select(["run_id", *RUN_FIELDS]).group_by(["run_id", *RUN_FIELDS]).aggregate([])
    identity: dict[str, dict] = {}
    for r in combos.to_pylist():
        prev = identity.setdefault(r["run_id"], r)
        if prev is not r:
            diff = [f for f in RUN_FIELDS if prev[f] != r[f]]
            raise HarnessError(f"records: run {r['run_id']} has rows with different {', '.join(diff)}")
    for r in identity.values():
        try:
            json.loads(r["hparams"])
        except (TypeError, ValueError):
            raise HarnessError(f"records: run {r['run_id']}: field 'hparams' is not JSON: {r['hparams']!r}") from None


def _accuracy_curve(rows: list[dict], *, role: str | None = None, split: str | None = None) -> dict[int, float]:
    """Overall main-protocol accuracy per epoch on one split (chosen by role or by name)."""
    picked = [r for r in rows if r["metric"] == "accuracy" and r["protocol"] == MAIN and r["domain_kind"] == "all"
              and (role is None or r["split_role"] == role) and (split is None or r["split"] == split)]
    splits = {r["split"] for r in picked}
    if len(splits) > 1:
        raise HarnessError(f"run {rows[0]['run_id']}: several {role} splits {sorted(splits)}; a scheme has one "
                           "selection split")
    curve: dict[int, float] = {}
    for r in picked:
        if r["epoch"] in curve:
            raise HarnessError(f"run {r['run_id']} epoch {r['epoch']}: two main overall accuracies on split "
                               f"'{r['split']}'")
        curve[r["epoch"]] = r["value"]
    return curve


def _best(curve: dict[int, float]) -> int:
    # max over (value, -epoch): the highest accuracy, and among equals the earliest epoch.
    return max(curve, key=lambda e: (curve[e], -e))


def select_epoch(run_records: pa.Table | Iterable[Mapping], rule: str = "val", *,
                 oracle_split: str | None = None) -> Selection:
    """The selected epoch of one run (all its rows, any epochs). "val" reads only rows with
    split_role "val"; "oracle" needs `oracle_split` and reads that split only."""
    rows = _rows(run_records)
    if not rows:
        raise HarnessError("select_epoch: no records for this run")
    run = rows[0]["run_id"]
    if rule == "val":
        curve = _accuracy_curve(rows, role="val")
        if not curve:
            raise HarnessError(f"run {run}: no validation accuracy (split_role 'val', domain_kind 'all', protocol "
                               "'main'); use --selection last-epoch or record the validation split")
        split = next(r["split"] for r in rows if r["split_role"] == "val")
        epoch = _best(curve)
        return Selection(epoch, rule, split, curve[epoch])
    if rule == "last-epoch":
        epochs = [r["epoch"] for r in rows if r["protocol"] == MAIN]
        if not epochs:
            raise HarnessError(f"run {run}: no 'main' protocol records")
        return Selection(max(epochs), rule, None, None)
    if rule == "oracle":
        if oracle_split is None:
            raise HarnessError("select_epoch: rule 'oracle' needs oracle_split (the split being reported)")
        curve = _accuracy_curve(rows, split=oracle_split)
        if not curve:
            raise HarnessError(f"run {run}: no overall accuracy on split '{oracle_split}'")
        epoch = _best(curve)
        return Selection(epoch, rule, oracle_split, curve[epoch])
    raise HarnessError(f"unknown selection rule '{rule}' (choose from {', '.join(RULES)})")


def group_runs(records: pa.Table) -> dict[tuple[str, str], list[dict]]:
    """Rows by (run_id, track)."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records.to_pylist():
        runs[(r["run_id"], r["track"])].append(r)
    return dict(runs)


def _check_unique(rows: list[dict]) -> None:
    # One value per cell: a 'main' evaluation is one number per (split, domain); sweeps add their knob.
    seen: dict[tuple, dict] = {}
    for r in rows:
        key = (r["split"], r["domain_kind"], r["domain"], r["protocol"])
        if r["protocol"] != MAIN:
            key += (r["eval_batch_size"], r["n_controls"])
        if key in seen:
            raise HarnessError(f"run {r['run_id']} epoch {r['epoch']}: duplicate {r['protocol']} accuracy for split "
                               f"'{r['split']}' {r['domain_kind']}={r['domain']} (eval_batch_size "
                               f"{seen[key]['eval_batch_size']} and {r['eval_batch_size']})")
        seen[key] = r


def _out(r: dict, sel: Selection) -> dict:
    return {**{k: r[k] for k in SELECTED_SCHEMA.names if k in r}, "selection_rule": sel.rule,
            "selection_split": sel.split, "epoch": sel.epoch}


def selected_results(records: pa.Table, rule: str = "val", protocols: Iterable[str] = (MAIN,)) -> pa.Table:
    """Per run, the accuracies (overall and per domain) of its val and test splits at its selected
    epoch, one row per number (SELECTED_SCHEMA). Train-split and loss rows are dropped."""
    if rule not in RULES:
        raise HarnessError(f"unknown selection rule '{rule}' (choose from {', '.join(RULES)})")
    protocols = tuple(protocols)
    validate(records)
    # Only val/test accuracies matter from here on; filtering in Arrow first keeps big record sets cheap.
    keep = pc.and_(pc.equal(records.column("metric"), "accuracy"),
                   pc.is_in(records.column("split_role"), pa.array(["val", "test"])))
    records = records.filter(keep)
    out: list[dict] = []
    for rows in group_runs(records).values():
        wanted = [r for r in rows if r["protocol"] in protocols]
        if rule == "oracle":
            for split in sorted({r["split"] for r in wanted}):
                sel = select_epoch(rows, "oracle", oracle_split=split)
                at = [r for r in wanted if r["split"] == split and r["epoch"] == sel.epoch]
                _check_unique(at)
                out.extend(_out(r, sel) for r in at)
            continue
        sel = select_epoch(rows, rule)
        at = [r for r in wanted if r["epoch"] == sel.epoch]
        _check_unique(at)
        out.extend(_out(r, sel) for r in at)
    return pa.Table.from_pylist(out, schema=SELECTED_SCHEMA)


# --- hyperparameter configs: one per (dataset, split scheme, method, track), never mixed across seeds ---

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


def parse_best_configs(obj) -> dict[str, dict]:
    """Validate a best_configs mapping {method: {"hparams": dict | JSON string, "trials": int}}."""
    if not isinstance(obj, dict):
        raise HarnessError("best_configs: expected a JSON object {method: {\"hparams\": ..., \"trials\": ...}}")
    parsed = {}
    for method, entry in obj.items():
        if not isinstance(entry, dict) or "hparams" not in entry:
            raise HarnessError(f"best_configs: method '{method}': expected an object with key 'hparams'")
        unknown = set(entry) - {"hparams", "trials"}
        if unknown:
            raise HarnessError(f"best_configs: method '{method}': unknown key(s) {sorted(unknown)} "
                               "(allowed: hparams, trials)")
        hp = entry["hparams"]
        if isinstance(hp, str):
            try:
                hp = json.loads(hp)
            except ValueError:
                raise HarnessError(f"best_configs: method '{method}': 'hparams' is not JSON: {hp!r}") from None
        trials = entry.get("trials")
        if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
            raise HarnessError(f"best_configs: method '{method}': 'trials' must be a positive integer, got {trials!r}")
        parsed[method] = {"hparams": hp, "trials": trials}
    return parsed


def choose_configs(selected: pa.Table, best_configs: Mapping[str, dict] | None = None
                   ) -> dict[tuple[str, str, str, str], ConfigChoice]:
    """One hparams config per (dataset, split_scheme, method, track). With `best_configs` (see
    parse_best_configs) a listed method uses that config; otherwise the config with the best mean
    selected-validation accuracy over its seeds wins (ties: more seeds, then the smaller JSON string)."""
    best = parse_best_configs(best_configs) if best_configs is not None else {}
    # val score of each run at its selected epoch
    val: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    configs: dict[tuple, set[str]] = defaultdict(set)
    for r in selected.to_pylist():
        key = (r["dataset"], r["split_scheme"], r["method"], r["track"])
        configs[key].add(r["hparams"])
        if (r["split_role"] == "val" and r["domain_kind"] == "all" and r["protocol"] == MAIN):
            val[key][r["hparams"]][r["seed"]] = r["value"]
    unused = set(best) - {k[2] for k in configs}
    if unused:
        raise HarnessError(f"best_configs: method(s) {sorted(unused)} have no records")
    choices = {}
    for key, hps in configs.items():
        method = key[2]
        if method in best:
            want = best[method]["hparams"]
            match = [h for h in hps if json.loads(h) == want]
            if not match:
                raise HarnessError(f"best_configs: method '{method}': config {json.dumps(want, sort_keys=True)} has no "
                                   f"records in {key[0]}/{key[1]} ({len(hps)} config(s) recorded)")
            h = match[0]
            scores = val[key].get(h, {})
            vm = sum(scores.values()) / len(scores) if scores else None
            choices[key] = ConfigChoice(h, "best-configs", len(hps), vm, best[method]["trials"])
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
