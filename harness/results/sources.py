"""Result sources: storage roots and exported bundles (harness/results/bundle.py) read as one set of runs.

A run is identified by content: its id is a hash of (dataset checksum, scheme, method, hparams, backbone,
seed, protocol, code), so the same id in two sources is the same run. Merging therefore
- collapses a run found in several sources when its records are identical (it keeps one copy and remembers
  every source it came from, so n is unchanged);
- refuses a run id whose records differ between two sources, naming both: one of them is not what its id says;
- refuses one dataset name and split scheme recorded with different dataset checksums in two sources: two
  versions of a dataset cannot share a table.
Each source holds its complete runs only (harness/results/completeness.py); the runs it leaves out are reported
(`Merged.skipped`, each naming its source).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from platebench.datasets.storage import StorageOptions

from ..errors import HarnessError
from .bundle import is_bundle, read_bundle, verify_files
from .completeness import describe, read_complete
from .layout import EPOCH_FILES, RECORDS_DIR, storage_root
from .records import RECORD_SCHEMA

# The columns that say which number a record row is (everything but the number itself).
ROW_KEY = [n for n in RECORD_SCHEMA.names if n not in ("value", "n")]


@dataclass
class Source:
    label: str  # as the user named it: how tables cite it
    root: str
    records: pa.Table
    done: dict[str, dict]  # run_id -> its done marker
    bundle: dict | None = None  # the bundle's BUNDLE_FILE when the source is a bundle
    skipped: list[dict] = field(default_factory=list)  # incomplete runs left out (completeness.read_complete)


def read_source(url: str, options: StorageOptions | None = None) -> Source:
    root = storage_root(url)
    bundle = None
    if is_bundle(root, options):  # every file checked against bundle.json before any is used
        bundle = read_bundle(root, options)
        problems = verify_files(root, bundle, options)
        if problems:
            more = f" (and {len(problems) - 1} more: `platebench validate {url}` lists them)"
            raise HarnessError(f"{url}: {problems[0]}{more if len(problems) > 1 else ''}")
    complete = read_complete(root, options)
    skipped = [{**s, "source": url} for s in complete.skipped]
    if len(complete.records) == 0:
        if skipped:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise HarnessError(f"no complete run under {url}: {describe(complete.skipped[0])}{more}")
        raise HarnessError(f"no records under {url} (expected {RECORDS_DIR}/<run_id>/{EPOCH_FILES})")
    return Source(url, root, complete.records, complete.done, bundle, skipped)


@dataclass
class Merged:
    records: pa.Table
    sources: dict[str, list[str]] = field(default_factory=dict)  # run_id -> labels of the sources holding it
    done: dict[str, dict] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    collapsed: list[dict] = field(default_factory=list)  # runs found in several sources with identical records
    skipped: list[dict] = field(default_factory=list)  # incomplete runs left out, each naming its source


def _first_difference(a: pa.Table, b: pa.Table) -> str:
    def keyed(t: pa.Table) -> dict:
        return {tuple(r[k] for k in ROW_KEY): (r["value"], r["n"]) for r in t.to_pylist()}

    ka, kb = keyed(a), keyed(b)
    for key in sorted(set(ka) | set(kb), key=repr):
        if ka.get(key) != kb.get(key):
            row = dict(zip(ROW_KEY, key))
            where = (f"epoch {row['epoch']} split '{row['split']}' {row['domain_kind']}={row['domain']} "
                     f"{row['protocol']} {row['metric']}")
            va = "absent" if key not in ka else f"{ka[key][0]!r} (n={ka[key][1]})"
            vb = "absent" if key not in kb else f"{kb[key][0]!r} (n={kb[key][1]})"
            return f"{where}: {va} vs {vb}"
    return "the same rows in another order"  # pragma: no cover - tables are sorted before comparing


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in RECORD_SCHEMA.names])


def merge(sources: Sequence[Source]) -> Merged:
    """One record set from several sources (rules in the module docstring)."""
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise HarnessError(f"--records names {dup[0]} more than once")
    versions: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (dataset, scheme) -> checksum -> label
    for s in sources:
        combos = s.records.select(["dataset", "split_scheme", "dataset_checksum"]).group_by(
            ["dataset", "split_scheme", "dataset_checksum"]).aggregate([])
        for r in combos.to_pylist():
            versions[(r["dataset"], r["split_scheme"])].setdefault(r["dataset_checksum"], s.label)
    for (ds, sc), by_checksum in sorted(versions.items()):
        # Two versions inside one source are build_leaderboard's error; here two sources disagree.
        if len(set(by_checksum.values())) > 1:
            ordered = sorted(by_checksum.items(), key=lambda kv: labels.index(kv[1]))
            (c1, l1), (c2, l2) = ordered[0], next(kv for kv in ordered if kv[1] != ordered[0][1])
            raise HarnessError(f"dataset '{ds}' scheme '{sc}': {l1} and {l2} hold different dataset versions "
                               f"(checksum {c1[:16]}… in {l1}, {c2[:16]}… in {l2}); merge only results of one "
                               "dataset version, or build separate leaderboards")
    owner: dict[str, Source] = {}
    run_sources: dict[str, list[str]] = defaultdict(list)
    keep: list[pa.Table] = []
    done: dict[str, dict] = {}
    for s in sources:
        ids = pc.unique(s.records.column("run_id")).to_pylist()
        seen = [i for i in ids if i in owner]
        fresh = [i for i in ids if i not in owner]
        by_owner: dict[str, list[str]] = defaultdict(list)
        for run_id in seen:
            by_owner[owner[run_id].label].append(run_id)
        for label, run_ids in by_owner.items():
            first = next(x for x in sources if x.label == label)
            # One comparison of all the shared runs; run by run only to name the first that differs.
            a = _sorted(first.records.filter(pc.is_in(first.records.column("run_id"), pa.array(run_ids))))
            b = _sorted(s.records.filter(pc.is_in(s.records.column("run_id"), pa.array(run_ids))))
            if not a.equals(b):
                for run_id in sorted(run_ids):
                    ra = a.filter(pc.equal(a.column("run_id"), run_id))
                    rb = b.filter(pc.equal(b.column("run_id"), run_id))
                    if not ra.equals(rb):
                        raise HarnessError(
                            f"run {run_id}: {label} and {s.label} hold different numbers for the same run id (first "
                            f"difference: {_first_difference(ra, rb)}); a run id names one result, so one source is "
                            "not what it claims: remove the run from one of them")
            for run_id in run_ids:
                run_sources[run_id].append(s.label)
                if run_id not in done and run_id in s.done:
                    done[run_id] = s.done[run_id]
        if fresh:
            keep.append(s.records.filter(pc.is_in(s.records.column("run_id"), pa.array(fresh))))
        for run_id in fresh:
            owner[run_id] = s
            run_sources[run_id].append(s.label)
            if run_id in s.done:
                done[run_id] = s.done[run_id]
    records = pa.concat_tables(keep) if keep else RECORD_SCHEMA.empty_table()
    collapsed = [{"run_id": k, "sources": v} for k, v in sorted(run_sources.items()) if len(v) > 1]
    return Merged(records, dict(run_sources), done, labels, collapsed, [x for s in sources for x in s.skipped])


def load(urls: Sequence[str], options: StorageOptions | None = None) -> Merged:
    return merge([read_source(u, options) for u in urls])
