"""Same-checkpoint rows for shared trainings. A method that declares `trains_as` (AdaBN trains as ERM, ABRA+TTA as
ABRA) is evaluated from its parent's weights, but each run selects its own epoch (selection.py), so its usual row
and the parent's may read one training at two epochs. A same-checkpoint row is the paired difference
variant − parent per seed with BOTH read at the parent's selected epoch for that seed. The variant has records
there only where the trainer evaluated it there (test splits: its own selectable epochs,
harness/train/selectable_epochs.py); a seed without them is reported missing, never read at another epoch.

A parent run shares the variant's training when it is a run of the parent method on the same dataset, scheme and
seed whose hyperparameters equal the variant's training ones (its hparams without `predict_hparams`), and, where
both done markers name a training id, the same one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from . import stats
from .vocabulary import ACCURACY, ALL, MAIN

KIND = "same-checkpoint"


def shared_trainings(methods: Iterable[str]) -> dict[str, type]:
    """variant -> its Method class, for the registered methods among `methods` that declare `trains_as`."""
    from platebench.methods.registry import get_method, names

    known = set(names())
    return {m: cls for m in sorted(set(methods)) if m in known and (cls := get_method(m)).trains_as}


def _canon(hparams: Mapping) -> str:
    return json.dumps(hparams, sort_keys=True, separators=(",", ":"))


class SameCheckpoint:
    """The lookups every same-checkpoint row needs, built once per leaderboard."""

    def __init__(self, records: pa.Table, selected_rows: list[dict], methods: Iterable[str],
                 done: Mapping[str, Mapping] | None = None):
        self.variants = shared_trainings(methods)
        self.done = done or {}
        self.parents: dict = defaultdict(list)  # (dataset, scheme, split, method, seed) -> selected Total rows
        for r in selected_rows:
            if r["protocol"] == MAIN and r["domain_kind"] == ALL:
                self.parents[(r["dataset"], r["split_scheme"], r["split"], r["method"], r["seed"])].append(r)
        self.parent_present = {(r["dataset"], r["split_scheme"], r["method"]) for r in selected_rows}
        self.at: dict = {}  # (run_id, track, epoch, split) -> the variant's main Total accuracy there
        if self.variants:
            want = pc.and_(pc.and_(pc.equal(records.column("protocol"), MAIN),
                                   pc.equal(records.column("metric"), ACCURACY)),
                           pc.and_(pc.equal(records.column("domain_kind"), ALL),
                                   pc.is_in(records.column("method"), pa.array(list(self.variants)))))
            cols = ["run_id", "track", "epoch", "split", "value"]
            for r in records.filter(want).select(cols).to_pylist():
                self.at[(r["run_id"], r["track"], r["epoch"], r["split"])] = r["value"]
        self.notes: list[str] = []

    def _training_id(self, run_id: str) -> str | None:
        return (self.done.get(run_id) or {}).get("training_id")

    def _parent_run(self, cls: type, parent: str, key: tuple, vrow: dict) -> tuple[dict | None, str | None]:
        """The parent's selected Total row of the run sharing `vrow`'s training, or (None, why not)."""
        want = _canon(cls.training_hparams(json.loads(vrow["hparams"])))
        found = [p for p in self.parents.get((*key, parent, vrow["seed"]), [])
                 if _canon(json.loads(p["hparams"])) == want]
        tid = self._training_id(vrow["run_id"])
        if tid is not None:
            found = [p for p in found if self._training_id(p["run_id"]) in (None, tid)]
        if not found:
            return None, f"no {parent} run of this seed with the training hparams {want}"
        if len(found) > 1:
            return None, f"several {parent} runs share it ({', '.join(sorted(p['run_id'] for p in found))})"
        return found[0], None

    def rows(self, key: tuple[str, str, str], track: str, cells: Mapping, methods: Iterable[str],
             alpha: float) -> list[dict]:
        """The same-checkpoint rows of one table (`key`: dataset, scheme, split) for its variants among `methods`,
        with Holm's correction over the complete ones."""
        out = []
        for m in sorted(set(methods) & set(self.variants)):
            cls = self.variants[m]
            parent = cls.trains_as
            if (key[0], key[1], parent) not in self.parent_present:
                note = f"{m} trains as {parent}, which has no runs on {key[0]}/{key[1]}: no same-checkpoint row"
                if note not in self.notes:
                    self.notes.append(note)
                continue
            total = cells[(*key, track, m)].get("total", {})
            epochs, own, vals, pvals, missing, runs, pruns, ptracks = {}, {}, {}, {}, {}, set(), set(), set()
            for seed, vrow in sorted(total.items()):
                own[str(seed)] = vrow["epoch"]
                runs.add(vrow["run_id"])
                prow, why = self._parent_run(cls, parent, key, vrow)
                if prow is None:
                    missing[str(seed)] = why
                    continue
                epochs[str(seed)] = prow["epoch"]
                pruns.add(prow["run_id"])
                ptracks.add(prow["track"])
                v = self.at.get((vrow["run_id"], vrow["track"], prow["epoch"], key[2]))
                if v is None:
                    missing[str(seed)] = (f"{m} has no {key[2]} record at {parent}'s selected epoch {prow['epoch']} "
                                          f"(it is evaluated there only at its own selectable epochs)")
                    continue
                vals[seed], pvals[seed] = v, prow["value"]
            summ, psumm = stats.summarize(list(vals.values())), stats.summarize(list(pvals.values()))
            cmp = stats.compare_paired(vals, pvals)
            out.append({
                "kind": KIND, "method": m, "track": track, "parent": parent, "parent_track": sorted(ptracks),
                "epochs": epochs, "own_epochs": own,
                "per_seed": {str(s): v for s, v in vals.items()}, "mean": summ.mean, "std": summ.std, "n": summ.n,
                "parent_per_seed": {str(s): v for s, v in pvals.items()}, "parent_mean": psumm.mean,
                "parent_std": psumm.std,
                "n_paired": cmp.n_paired, "diff_mean": cmp.diff_mean, "p_paired_t": cmp.p_paired_t,
                "p_wilcoxon": cmp.p_wilcoxon, "diff_ci95": list(cmp.diff_ci95) if cmp.diff_ci95 else None,
                "no_spread": cmp.no_spread, "p_holm": None, "significant_holm": None,
                "missing_seeds": missing, "complete": not missing and bool(vals),
                "run_ids": sorted(runs), "parent_run_ids": sorted(pruns),
            })
        tested = [r for r in out if r["complete"]]
        for r, (p_adj, sig) in zip(tested, stats.holm([r["p_paired_t"] for r in tested], alpha)):
            r["p_holm"], r["significant_holm"] = p_adj, sig
        return out
