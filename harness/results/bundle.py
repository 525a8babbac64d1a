"""Result bundles: what a contributor sends a leaderboard maintainer (`platebench export`).

A bundle is a folder of data only, laid out like a storage root so every reader works on it unchanged:

    bundle.json                          what the bundle holds (below)
    records/<run_id>/epoch-*.parquet     the runs' records, byte for byte
    runs/<run_id>/spec.json, done.json   each run's spec and done marker

No weights, checkpoints or pickles ever: only the files named above are copied (an allowlist, not a filter),
and `platebench validate` refuses any other file in a bundle. bundle.json holds

    {"format": "platebench-bundle", "format_version": 1, "created", "exported_from", "filters",
     "runs": [{"run_id", "method", "seed", "dataset", "dataset_checksum", "split_scheme", "hparams", "code",
               "git_commit", "training_id", "device", "files"}],
     "datasets": [{"dataset", "dataset_checksum", "split_scheme", "manifest": {"url", "status", ...},
                   "scheme": {description, splits, selection_split, selection_rule} | null, "classes"}],
     "code": [{"version", "source", "label"}], "environment": {"python", "platebench", "torch", "ray", "platform",
     "devices"}, "left_out": [...], "files": {path: sha256}}

The dataset's scheme definition comes from the manifest at the runs' "data" URL when it is readable and still
has the records' checksum; otherwise the checksum alone is listed (with why). The environment is the
exporting machine's package versions (done markers do not record them) plus every device the runs trained on.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
from platebench.datasets.storage import StorageOptions, filesystem, join, put_atomic, with_retries

from .. import __version__
from ..errors import USER_ERRORS, HarnessError
from .layout import (
    BUNDLE_FILE,
    DONE_FILE,
    EPOCH_FILES,
    RECORDS_DIR,
    RUNS_DIR,
    SPEC_FILE,
    read_json,
    read_run_file,
    records_dir,
    storage_root,
)
from .records import read_records, validate

BUNDLE_FORMAT = "platebench-bundle"
BUNDLE_VERSION = 1
RUN_FILES = (SPEC_FILE, DONE_FILE)  # the only run files a bundle holds
# The only files a bundle holds: anything else, weights and pickles above all, is refused by `platebench validate`.
BUNDLE_PATHS = re.compile(rf"^({re.escape(BUNDLE_FILE)}|{RECORDS_DIR}/[^/]+/epoch-\d+(\.[a-z]+)?\.parquet"
                          rf"|{RUNS_DIR}/[^/]+/({'|'.join(map(re.escape, RUN_FILES))}))$")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(devices: Sequence[str], trained_with: Sequence[dict] = ()) -> dict:
    """The versions the runs trained with (their done markers' "environment"), and the exporting machine's."""
    return {"trained_with": [json.loads(t) for t in sorted({json.dumps(e, sort_keys=True) for e in trained_with if e})],
            "exported_with": {"python": platform.python_version(), "platebench": __version__,
                              "torch": _version("torch"), "ray": _version("ray"), "platform": platform.platform()},
            "devices": sorted(set(devices))}


def _manifest_info(data_urls: list[str], checksum: str, scheme: str, options) -> dict:
    """Scheme definition and classes from the first readable manifest with the records' checksum."""
    from platebench.datasets.manifest import MANIFEST_NAME, Manifest

    tried = []
    for url in data_urls:
        where = join(url, MANIFEST_NAME)
        try:
            fs, path = filesystem(where, options)
            m = Manifest.from_json(fs.cat_file(path), where)
        except (OSError, *USER_ERRORS) as exc:
            tried.append(f"{where}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        if m.checksum() != checksum:
            tried.append(f"{where}: checksum {m.checksum()[:16]}… is not the records' (the dataset changed since)")
            continue
        if scheme not in m.split_schemes:
            tried.append(f"{where}: has no split scheme '{scheme}'")
            continue
        s = m.split_schemes[scheme]
        return {"manifest": {"url": where, "status": "read", "name": m.name, "version": m.version},
                "scheme": {"description": s.description, "splits": s.splits, "selection_split": s.selection_split,
                           "selection_rule": s.selection_rule},
                "classes": m.classes}
    return {"manifest": {"url": None, "status": "checksum only", "tried": tried}, "scheme": None, "classes": None}


def export_bundle(records_url: str, out: str, methods: Sequence[str] | None = None, dataset: str | None = None,
                  options: StorageOptions | None = None) -> dict:
    """Write a bundle of the finished runs under `records_url` (filtered by method and dataset name) to `out`;
    returns bundle.json's content."""
    root = storage_root(records_url)
    records = read_records(root, options)
    if len(records) == 0:
        raise HarnessError(f"no records under {records_url} (expected {RECORDS_DIR}/<run_id>/{EPOCH_FILES})")
    validate(records)
    present_m = sorted(set(pc.unique(records.column("method")).to_pylist()))
    present_d = sorted(set(pc.unique(records.column("dataset")).to_pylist()))
    if methods:
        if unknown := [m for m in methods if m not in present_m]:
            raise HarnessError(f"--methods: no runs of {', '.join(unknown)} under {records_url} (methods there: "
                               f"{', '.join(present_m)})")
        records = records.filter(pc.is_in(records.column("method"), pa.array(list(methods))))
    if dataset is not None:
        if dataset not in present_d:
            raise HarnessError(f"--dataset: no runs of dataset '{dataset}' under {records_url} (datasets there: "
                               f"{', '.join(present_d)})")
        records = records.filter(pc.equal(records.column("dataset"), dataset))
    if len(records) == 0:
        raise HarnessError(f"no runs under {records_url} match --methods {' '.join(methods or [])} and "
                           f"--dataset {dataset}")
    ofs, oroot = filesystem(out, options)
    if with_retries(lambda: ofs.exists(oroot) and bool(ofs.ls(oroot)), f"reading {out}"):
        unfinished = not with_retries(lambda: ofs.exists(join(oroot, BUNDLE_FILE)), f"reading {out}")
        why = " and holds no bundle.json (an export that failed?); remove it or" if unfinished else ";"
        raise HarnessError(f"{out}: exists, is not empty{why} export into a new folder")
    fs, base = filesystem(root, options)
    identity: dict[str, dict] = {}
    for r in records.select(["run_id", "method", "seed", "dataset", "dataset_checksum", "split_scheme", "hparams",
                             "code"]).group_by(["run_id", "method", "seed", "dataset", "dataset_checksum",
                                                "split_scheme", "hparams", "code"]).aggregate([]).to_pylist():
        identity[r["run_id"]] = r
    files: dict[str, bytes] = {}
    runs, left_out, devices, trained_with = [], [], [], []
    data_urls: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    codes: dict[str, dict] = {}
    for run_id in sorted(identity):
        done_bytes = read_run_file(root, run_id, DONE_FILE, options)
        if done_bytes is None:
            left_out.append({"run_id": run_id, "why": "no done marker (the run is not finished)"})
            continue
        rec_files = sorted(with_retries(lambda r=run_id: fs.glob(join(records_dir(base, r), EPOCH_FILES)),
                                        f"listing {records_dir(root, run_id)}"))
        own = {}
        for f in rec_files:
            own[f"{RECORDS_DIR}/{run_id}/{f.rsplit('/', 1)[1]}"] = with_retries(lambda f=f: fs.cat_file(f),
                                                                                 f"reading {f}")
        spec_bytes = read_run_file(root, run_id, SPEC_FILE, options)
        done = json.loads(done_bytes)
        spec = json.loads(spec_bytes) if spec_bytes is not None else done.get("spec", {})
        for name, data in ((DONE_FILE, done_bytes), (SPEC_FILE, spec_bytes)):
            if data is not None:
                own[f"{RUNS_DIR}/{run_id}/{name}"] = data
        files.update(own)
        ident = identity[run_id]
        code = spec.get("code") or {}
        codes[ident["code"]] = {"version": code.get("version"), "source": code.get("source"), "label": ident["code"]}
        device = (done.get("resources") or {}).get("device")
        devices += [device] if device else []
        trained_with.append(done.get("environment") or {})
        if spec.get("data"):
            key = (ident["dataset"], ident["dataset_checksum"], ident["split_scheme"])
            if spec["data"] not in data_urls[key]:
                data_urls[key].append(spec["data"])
        runs.append({**ident, "hparams": json.loads(ident["hparams"]), "code_identity": code,
                     "git_commit": done.get("git_commit"), "training_id": done.get("training_id"),
                     "device": device, "selected_epoch": done.get("selected_epoch"), "files": sorted(own)})
    if not runs:
        raise HarnessError(f"no finished run to export under {records_url} ({len(left_out)} run(s) without a done "
                           "marker)")
    datasets = []
    for ds, checksum, scheme in sorted({(r["dataset"], r["dataset_checksum"], r["split_scheme"]) for r in runs}):
        datasets.append({"dataset": ds, "dataset_checksum": checksum, "split_scheme": scheme,
                         **_manifest_info(data_urls[(ds, checksum, scheme)], checksum, scheme, options)})
    bundle = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "exported_from": records_url,
              "filters": {"methods": list(methods) if methods else None, "dataset": dataset},
              "runs": runs, "datasets": datasets, "code": [codes[k] for k in sorted(codes)],
              "environment": environment(devices, trained_with), "left_out": left_out,
              "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}}

    def write():
        for name, data in sorted(files.items()):
            ofs.makedirs(join(oroot, name.rsplit("/", 1)[0]), exist_ok=True)
            put_atomic(ofs, join(oroot, name), data)
        # bundle.json last: its presence means the bundle is whole
        put_atomic(ofs, join(oroot, BUNDLE_FILE), (json.dumps(bundle, indent=1) + "\n").encode())

    ofs.makedirs(oroot, exist_ok=True)
    with_retries(write, f"writing the bundle to {out}")
    return bundle


def read_bundle(url: str, options: StorageOptions | None = None) -> dict:
    """bundle.json of a bundle, checked for its format; one line naming the file and field otherwise."""
    where = join(storage_root(url), BUNDLE_FILE)
    b = read_json(where, options)
    if not isinstance(b, dict):
        raise HarnessError(f"{where}: expected a JSON object")
    if b.get("format") != BUNDLE_FORMAT:
        raise HarnessError(f"{where}: field 'format' is {b.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if b.get("format_version") != BUNDLE_VERSION:
        raise HarnessError(f"{where}: field 'format_version' is {b.get('format_version')!r}; this platebench reads "
                           f"version {BUNDLE_VERSION}")
    for name, typ in (("runs", list), ("datasets", list), ("files", dict)):
        if not isinstance(b.get(name), typ):
            raise HarnessError(f"{where}: field '{name}' must be a JSON {'array' if typ is list else 'object'}")
    return b


def is_bundle(url: str, options: StorageOptions | None = None) -> bool:
    fs, root = filesystem(storage_root(url), options)
    return bool(with_retries(lambda: fs.exists(join(root, BUNDLE_FILE)), f"reading {url}"))


def verify_files(url: str, bundle: dict, options: StorageOptions | None = None) -> list[str]:
    """One line per data file of the bundle (records, specs, done markers) whose sha256 is not the one bundle.json
    lists, that bundle.json does not list, or that it lists but is missing: every reader of a bundle checks this
    before using it (a records file edited after export is refused, not read)."""
    fs, root = filesystem(storage_root(url), options)
    listed = bundle["files"]
    found = with_retries(lambda: fs.find(root), f"listing {url}")
    problems, present = [], set()
    for path in sorted(found):
        rel = path[len(root):].lstrip("/")
        present.add(rel)
        if rel == BUNDLE_FILE or not BUNDLE_PATHS.match(rel):
            continue  # bundle.json itself; other files are no bundle's (validate names them)
        want = listed.get(rel)
        if want is None:
            problems.append(f"file {rel}: not listed in bundle.json 'files'")
        elif hashlib.sha256(with_retries(lambda p=path: fs.cat_file(p), f"reading {path}")).hexdigest() != want:
            problems.append(f"file {rel}: sha256 differs from bundle.json 'files' (changed after export)")
    missing = sorted(set(listed) - present)
    return problems + [f"file {rel}: listed in bundle.json 'files' but missing" for rel in missing]
