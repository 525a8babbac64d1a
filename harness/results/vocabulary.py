"""The record vocabulary: every value a record field may take (records.validate refuses others), which way each
metric is better, and the one filter for "the main overall number" that selection and tables read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from platebench.datasets.manifest import DOMAIN_KINDS as MANIFEST_DOMAIN_KINDS
from platebench.methods.base import TRACKS

# protocol: how an evaluation was run
MAIN = "main"  # the leaderboard's numbers
BATCH_SIZE_SWEEP = "batch-size-sweep"  # TTA: accuracy vs test batch size
CONTROLS_SWEEP = "controls-sweep"  # TTA: accuracy vs number of control rows per batch
REPRESENTATION = "representation"  # the representation analysis (harness/analysis/representation.py)
PROTOCOLS = (MAIN, BATCH_SIZE_SWEEP, CONTROLS_SWEEP, REPRESENTATION)

# split_role: the scheme's training split, its selection split ("val") and its test splits
ROLES = ("train", "val", "test")

# domain_kind: "all" is the overall number (its domain is "all" too); the others are per-domain numbers
ALL = "all"
DOMAIN_KINDS = (ALL, *MANIFEST_DOMAIN_KINDS)

# metric, and whether higher is better (tables rank by it)
ACCURACY = "accuracy"
LOSS = "loss"
REPRESENTATION_METRICS = ("map_activity", "frac_retrieved", "map_consistency", "silhouette_batch",
                          "graph_connectivity", "ilisi", "bn_shift_kl", "bn_shift_mmd")
HIGHER_IS_BETTER = {ACCURACY: True, LOSS: False, "map_activity": True, "frac_retrieved": True,
                    "map_consistency": True, "silhouette_batch": True, "graph_connectivity": True, "ilisi": True,
                    "bn_shift_kl": False, "bn_shift_mmd": False}
METRICS = (ACCURACY, LOSS, *REPRESENTATION_METRICS)

__all__ = ["ACCURACY", "ALL", "BATCH_SIZE_SWEEP", "CONTROLS_SWEEP", "DOMAIN_KINDS", "HIGHER_IS_BETTER", "LOSS", "MAIN",
           "METRICS", "PROTOCOLS", "REPRESENTATION", "REPRESENTATION_METRICS", "ROLES", "TRACKS", "is_main_overall",
           "main_overall"]


def is_main_overall(row: Mapping, metric: str | None = ACCURACY) -> bool:
    """Whether `row` is a main-protocol overall (domain "all") `metric` value: the number a leaderboard cell, a
    selection rule and a run's summary read. `metric=None` for selected results (selection.SELECTED_SCHEMA), which
    are accuracies only and carry no metric field."""
    return (row["protocol"] == MAIN and row["domain_kind"] == ALL
            and (metric is None or row["metric"] == metric))


def main_overall(rows: Iterable[Mapping], metric: str | None = ACCURACY) -> list:
    """The rows `is_main_overall` keeps."""
    return [r for r in rows if is_main_overall(r, metric)]
