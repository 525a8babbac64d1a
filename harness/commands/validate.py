"""`platebench validate PATH ...`: check suites, search spaces, best-configs files, records folders and bundles."""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands.flags import add_json_flag

    p = sub.add_parser("validate", help="check suite and search-space files, best_configs.json, records folders and "
                                        "result bundles",
                       description="One line per problem naming the file, run and field; exit 2 when any. A folder "
                                   "is a storage root holding records/ and runs/ (records schema and vocabulary, "
                                   "complete runs, selection recomputed from the validation records, every run id "
                                   "recomputed from its spec.json, no duplicates, "
                                   "every seed of a method evaluated on the same splits and domains) or a result "
                                   "bundle from `platebench export` (also: data files only, checksums as listed, "
                                   "dataset checksums known, every split of the scheme evaluated). --json writes "
                                   "the report {path: {kind, problems, ...}}.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--manifest", action="append", default=[], metavar="URL",
                   help="a dataset root or manifest.json: every run on that dataset must have its checksum and be "
                        "evaluated on every split of its scheme (repeat for several datasets)")
    add_json_flag(p)
    return p


def run(args) -> int:
    import sys

    from platebench.harness.commands.flags import write_json
    from platebench.harness.errors import HarnessError
    from platebench.harness.results.validate import kind_of, validate_bundle, validate_file, validate_records

    report, total = {}, 0
    for path in args.paths:
        kind = kind_of(path)
        if kind == "records":
            problems, summary = validate_records(path, manifests=args.manifest)
        elif kind == "bundle":
            problems, summary = validate_bundle(path, manifests=args.manifest)
        else:
            problems, summary = validate_file(path, kind), {}
        report[path] = {"kind": kind, "problems": problems, **summary}
        total += len(problems)
        for line in problems:
            print(f"{path}: {line}" if not line.startswith(path) else line, file=sys.stderr)
        if not problems and args.json != "-":  # stdout is the report's
            print(f"{path}: {kind} OK" + (f" ({summary['runs']} runs)" if "runs" in summary else ""))
    if args.json:
        write_json(report, args.json)
    if total:
        raise HarnessError(f"{total} problem(s) in {sum(bool(r['problems']) for r in report.values())} path(s)")
    return 0
