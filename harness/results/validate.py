"""Validation of the files a user writes or receives, one problem per line naming the file, run and field.

- a suite (YAML with `methods`), a search space (YAML with `method` and `params`), a best-configs file (JSON):
  parsed by the same readers the commands use, so the first problem is the one the command would raise;
- a records folder (a storage root holding records/ and runs/): every record row against the schema and its
  vocabulary; every run complete (a done marker; validation at every epoch of its training; the test splits
  at every epoch a selection rule can choose); the epoch the run claims to have selected equal to the one
  recomputed from its records (from the validation split only); every run id recomputed from its spec.json
  (and the copy in done.json: a spec edited after the run hashes to another id, which a rehashed bundle.json
  cannot hide) and every records/<run_id>/ holding that run's records only; no two run ids with one identity;
  every run of a (dataset, scheme, method, hparams) group evaluated on the same splits and domains as the others;
- a bundle (a records folder with bundle.json, harness/results/bundle.py): all of the above, plus bundle.json
  readable; only bundle files (records, run specs, done markers: never weights, checkpoints or pickles), each
  with the sha256 bundle.json lists (bundle.verify_files, which `leaderboard --records` checks too); the runs
  bundle.json lists equal to those present; every run's dataset checksum listed among the bundle's datasets;
  every run evaluated on every split of its scheme (when the bundle has the scheme's definition);
- with `--manifest URL` (a dataset root or its manifest.json), for records folders and bundles: every run on
  that dataset has its checksum, and every run is evaluated on every split of its scheme in that manifest.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from platebench.datasets.storage import StorageOptions, filesystem, join, with_retries

from ..errors import USER_ERRORS, HarnessError
from ..train.run_identity import run_id_of
from .bundle import BUNDLE_PATHS, is_bundle, read_bundle, verify_files
from .layout import DONE_FILE, RECORDS_DIR, RUNS_DIR, SPEC_FILE, read_done, read_run_json, storage_root
from .vocabulary import ACCURACY, MAIN


def kind_of(path: str) -> str:
    p = Path(path)
    if p.is_dir() or "://" in path:
        return "bundle" if is_bundle(path) else "records"
    if p.suffix == ".json":
        return "best-configs"
    if p.suffix in (".yaml", ".yml"):
        from ..config_files import load_yaml

        data = load_yaml(path, "file")
        if isinstance(data, dict) and "params" in data:
            return "search-space"
        return "suite"
    raise HarnessError(f"{path}: not a suite or search space (.yaml), best-configs file (.json) or records folder")


def validate_file(path: str, kind: str) -> list[str]:
    """Problems of one configuration file (the first one the reader finds)."""
    try:
        if kind == "suite":
            from ..suite import Suite, resolved_runs

            resolved_runs(Suite.load(path))
        elif kind == "search-space":
            from ..tune.space import load

            load(path)
        elif kind == "best-configs":
            from .best_configs import parse

            try:
                data = json.loads(Path(path).read_text())
            except ValueError as exc:
                raise HarnessError(f"{path}: not valid JSON ({exc})") from None
            parse(data, path)
    except USER_ERRORS as exc:
        return [str(exc)]
    return []


def validate_records(url: str, options: StorageOptions | None = None,
                     manifests: Sequence[str] = ()) -> tuple[list[str], dict]:
    """(problems, summary) of a storage root's records and done markers (and against `manifests`)."""
    problems, summary, rows_by_run = _check_records(url, options)
    if rows_by_run:
        problems += _group_problems(rows_by_run)
        problems += _manifest_problems(rows_by_run, manifests, options)
    return problems, summary


def _check_records(url: str, options: StorageOptions | None) -> tuple[list[str], dict, dict[str, list[dict]]]:
    from .records import overall, read_records
    from .records import validate as validate_schema
    from .selection import LEADERBOARD_RULES, select_epoch

    problems: list[str] = []
    try:
        records = read_records(url, options)
        validate_schema(records)
    except USER_ERRORS as exc:
        return [str(exc)], {"runs": 0}, {}
    rows_by_run: dict[str, list[dict]] = defaultdict(list)
    for r in records.to_pylist():
        rows_by_run[r["run_id"]].append(r)
    identities: dict[tuple, str] = {}
    for run_id, rows in sorted(rows_by_run.items()):
        first = rows[0]
        identity = (first["dataset_checksum"], first["split_scheme"], first["method"], first["hparams"],
                    first["seed"], first["code"])
        if identity in identities:
            problems.append(f"run {run_id}: same dataset, scheme, method, hparams, seed and code as run "
                            f"{identities[identity]} (a duplicate)")
        identities.setdefault(identity, run_id)
        done = read_done(storage_root(url), run_id, options)
        if done is None:
            problems.append(f"run {run_id}: no done marker ({RUNS_DIR}/{run_id}/{DONE_FILE}): the run is "
                            "incomplete")
            continue
        problems += _identity_problems(url, run_id, rows, done, options)
        val = overall(rows, role="val")
        if not val:
            problems.append(f"run {run_id}: field 'split_role': no validation records")
            continue
        epochs = max(val)
        if sorted(val) != list(range(1, epochs + 1)):
            missing = sorted(set(range(1, epochs + 1)) - set(val))
            problems.append(f"run {run_id}: field 'epoch': validation records missing for epoch(s) {missing}")
        chosen = set()
        for rule in LEADERBOARD_RULES:
            try:
                chosen.add(select_epoch(rows, rule).epoch)
            except HarnessError:
                continue
        tested = {r["epoch"] for r in rows if r["split_role"] == "test" and r["protocol"] == MAIN}
        if chosen - tested:
            problems.append(f"run {run_id}: field 'split': no test-split records at selectable epoch(s) "
                            f"{sorted(chosen - tested)}")
        claimed = done.get("selected_epoch")
        recomputed = select_epoch(rows, "val").epoch
        if claimed is not None and claimed != recomputed:
            problems.append(f"run {run_id}: field 'selected_epoch': {DONE_FILE} claims epoch {claimed}, the "
                            f"validation records select epoch {recomputed}")
    problems += _folder_problems(url, options)
    return problems, {"runs": len(rows_by_run), "records": len(records)}, rows_by_run


def _identity_problems(url: str, run_id: str, rows: list[dict], done: dict, options: StorageOptions | None
                       ) -> list[str]:
    """The run's spec (spec.json, and the copy in its done marker) hashes to its id, and says what its records say:
    an edited spec (or one rehashed into bundle.json) no longer names the run it is filed under."""
    from .records import RUN_FIELDS

    specs = []
    try:
        stored = read_run_json(storage_root(url), run_id, SPEC_FILE, options)
    except USER_ERRORS as exc:
        return [str(exc)]
    if stored is not None:
        specs.append((SPEC_FILE, stored))
    if isinstance(done.get("spec"), dict):
        specs.append((f"{DONE_FILE} 'spec'", done["spec"]))
    if not specs:
        return [f"run {run_id}: no {RUNS_DIR}/{run_id}/{SPEC_FILE}: its id cannot be checked"]
    problems = []
    for where, spec in specs:
        try:
            recomputed = run_id_of(spec)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"run {run_id}: {where}: not a run spec ({type(exc).__name__}: {exc})")
            continue
        if spec.get("run_id", run_id) != run_id:
            problems.append(f"run {run_id}: field 'run_id': {where} says {spec['run_id']!r}")
        if recomputed != run_id:
            # Which field was edited, where the records can tell (they carry a copy of these; code as a label).
            differs = [f for f in RUN_FIELDS if f in spec and f != "code" and _as_record(f, spec[f]) != rows[0][f]]
            fields = ", ".join(repr(f) for f in differs) or "'run_id'"
            problems.append(f"run {run_id}: field {fields}: {where} hashes to run id {recomputed}, not {run_id} "
                            "(the spec was changed after the run)")
    return problems


def _as_record(field: str, value):
    """A spec value as the records store it (hparams as canonical JSON)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if field == "hparams" else value


def _folder_problems(url: str, options: StorageOptions | None) -> list[str]:
    """Every records/<run_id>/ folder holds records of that run only."""
    from .records import read_records

    fs, root = filesystem(storage_root(url), options)
    folders = with_retries(lambda: fs.glob(join(root, RECORDS_DIR, "*")), f"listing {url}")
    problems = []
    for folder in sorted(f.rstrip("/").rsplit("/", 1)[-1] for f in folders):
        try:
            ids = set(read_records(url, options, run_ids=[folder]).column("run_id").to_pylist())
        except USER_ERRORS:
            continue  # named by _check_records
        others = sorted(ids - {folder})
        if others:
            problems.append(f"run {folder}: field 'run_id': {RECORDS_DIR}/{folder}/ holds records of "
                            f"run(s) {', '.join(others)}")
    return problems


def _evaluated(rows: list[dict]) -> dict[str, dict[int, set[tuple[str, str]]]]:
    """split -> epoch -> {(domain_kind, domain)} of a run's main-protocol accuracies."""
    out: dict[str, dict[int, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if r["protocol"] == MAIN and r["metric"] == ACCURACY:
            out[r["split"]][r["epoch"]].add((r["domain_kind"], r["domain"]))
    return out


def _group_problems(rows_by_run: dict[str, list[dict]]) -> list[str]:
    """Every run of a (dataset, scheme, method, hparams) group evaluated, at every epoch it evaluated a split, on
    the domains the group has for that split: a seed short of a domain would make that domain's column a mean over
    fewer seeds. Also within one run (its epochs must agree)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for run_id, rows in rows_by_run.items():
        r = rows[0]
        groups[(r["dataset"], r["split_scheme"], r["method"], r["hparams"])].append(run_id)
    problems = []
    for (ds, sc, method, _), run_ids in sorted(groups.items()):
        seen = {rid: _evaluated(rows_by_run[rid]) for rid in run_ids}
        seed = {rid: rows_by_run[rid][0]["seed"] for rid in run_ids}
        for split in sorted({sp for v in seen.values() for sp in v}):
            having = sorted(seed[rid] for rid in run_ids if split in seen[rid])
            union = set().union(*(doms for rid in run_ids for doms in seen[rid].get(split, {}).values()))
            for rid in sorted(run_ids):
                who = f"run {rid} ({ds}/{sc} {method} seed {seed[rid]})"
                if split not in seen[rid]:
                    problems.append(f"{who}: field 'split': no records of split '{split}', which seed(s) {having} "
                                    "of the same method and hparams have")
                    continue
                short = {e: union - doms for e, doms in sorted(seen[rid][split].items()) if union - doms}
                if short:
                    lacking = sorted(set().union(*short.values()))
                    shown = ", ".join(f"{k}={d}" for k, d in lacking[:5]) + (" ..." if len(lacking) > 5 else "")
                    problems.append(f"{who}: field 'domain': split '{split}' at epoch(s) {sorted(short)} lacks "
                                    f"{len(lacking)} domain(s) that other evaluations of this method and hparams have "
                                    f"({shown})")
    return problems


def _scheme_problems(rows_by_run: dict[str, list[dict]], schemes: dict[tuple[str, str], dict], where: str
                     ) -> list[str]:
    """Every run evaluated on every split of its scheme but train (which the trainer does not evaluate)."""
    problems = []
    for run_id, rows in sorted(rows_by_run.items()):
        r = rows[0]
        splits = schemes.get((r["dataset"], r["split_scheme"]))
        if splits is None:
            continue
        have = _evaluated(rows)
        for split in sorted(set(splits) - {"train"} - set(have)):
            problems.append(f"run {run_id}: field 'split': no records of split '{split}' of scheme "
                            f"'{r['split_scheme']}' ({where})")
    return problems


def read_manifest(url: str, options: StorageOptions | None = None):
    """The manifest at a dataset root or at a manifest.json URL."""
    from platebench.datasets.manifest import MANIFEST_NAME, Manifest
    from platebench.datasets.storage import describe_error

    where = url if url.rstrip("/").endswith(".json") else join(url, MANIFEST_NAME)
    fs, path = filesystem(where, options)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        raise HarnessError(f"--manifest {where}: not found") from None
    except OSError as exc:
        raise describe_error(exc, f"reading {where}") from exc
    return Manifest.from_json(text, where), where


def _manifest_problems(rows_by_run: dict[str, list[dict]], manifests: Sequence[str],
                       options: StorageOptions | None) -> list[str]:
    problems = []
    for url in manifests:
        try:
            m, where = read_manifest(url, options)
        except USER_ERRORS as exc:
            problems.append(str(exc))
            continue
        checksum = m.checksum()
        runs = {rid: rows for rid, rows in rows_by_run.items() if rows[0]["dataset"] == m.name}
        if not runs:
            names = sorted({rows[0]["dataset"] for rows in rows_by_run.values()})
            problems.append(f"--manifest {where}: no run here is on dataset '{m.name}' (datasets: {', '.join(names)})")
            continue
        for rid, rows in sorted(runs.items()):
            r = rows[0]
            if r["dataset_checksum"] != checksum:
                problems.append(f"run {rid}: field 'dataset_checksum': {r['dataset_checksum'][:16]}… is not the "
                                f"checksum of {where} ({checksum[:16]}…): another version of the dataset")
            elif r["split_scheme"] not in m.split_schemes:
                problems.append(f"run {rid}: field 'split_scheme': '{r['split_scheme']}' is not a scheme of {where}")
        schemes = {(m.name, name): s.splits for name, s in m.split_schemes.items()}
        problems += _scheme_problems(runs, schemes, where)
    return problems


PICKLE_OR_ZIP = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; zip (torch.save's format)


def validate_bundle(url: str, options: StorageOptions | None = None,
                    manifests: Sequence[str] = ()) -> tuple[list[str], dict]:
    """(problems, summary) of a bundle: everything validate_records checks, plus the bundle's own promises."""
    try:
        bundle = read_bundle(url, options)
    except USER_ERRORS as exc:
        return [str(exc)], {"runs": 0}
    fs, root = filesystem(storage_root(url), options)
    problems: list[str] = []
    found = sorted(with_retries(lambda: fs.find(root), f"listing {url}"))
    for path in found:
        rel = path[len(root):].lstrip("/")
        if not BUNDLE_PATHS.match(rel):
            head = with_retries(lambda p=path: fs.cat_file(p, start=0, end=4), f"reading {path}")
            what = " (a pickle or zip/torch file)" if head.startswith(PICKLE_OR_ZIP) else ""
            problems.append(f"file {rel}{what}: not part of a bundle (bundles hold records, run specs and done markers "
                            "only: no weights, checkpoints or pickles)")
    problems += verify_files(url, bundle, options)
    rec_problems, summary, rows_by_run = _check_records(url, options)
    problems += rec_problems
    listed = {r.get("run_id") for r in bundle["runs"] if isinstance(r, dict)}
    problems += [f"run {rid}: listed in bundle.json 'runs' but has no records" for rid in sorted(listed - set(
        rows_by_run)) if rid]
    problems += [f"run {rid}: has records but is not listed in bundle.json 'runs'" for rid in sorted(set(rows_by_run)
                                                                                                    - listed)]
    known = {(d.get("dataset"), d.get("split_scheme"), d.get("dataset_checksum")) for d in bundle["datasets"]
             if isinstance(d, dict)}
    for rid, rows in sorted(rows_by_run.items()):
        r = rows[0]
        if (r["dataset"], r["split_scheme"], r["dataset_checksum"]) not in known:
            problems.append(f"run {rid}: field 'dataset_checksum': {r['dataset_checksum'][:16]}… of "
                            f"{r['dataset']}/{r['split_scheme']} is not listed in bundle.json 'datasets'")
    if rows_by_run:
        problems += _group_problems(rows_by_run)
        given = set()
        for m in manifests:
            try:
                given.add(read_manifest(m, options)[0].name)
            except USER_ERRORS:
                pass  # named by _manifest_problems
        schemes = {(d["dataset"], d["split_scheme"]): d["scheme"]["splits"] for d in bundle["datasets"]
                   if isinstance(d, dict) and isinstance(d.get("scheme"), dict) and d.get("dataset") not in given
                   and isinstance(d["scheme"].get("splits"), dict)}
        problems += _scheme_problems(rows_by_run, schemes, "its definition in bundle.json")
        problems += _manifest_problems(rows_by_run, manifests, options)
    return problems, {**summary, "datasets": [{"dataset": d, "split_scheme": sc, "dataset_checksum": c}
                                               for d, sc, c in sorted(known, key=str)]}
