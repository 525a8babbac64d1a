"""`platebench validate PATH ...`: check suites, search spaces, best-configs files, records folders and bundles."""

from __future__ import annotations

import sys


def _count(text: str) -> int | str:
    """--reproduce: a number of runs, or "all"."""
    import argparse

    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of runs or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'all', got {value}")
    return value


def add_parser(sub):
    from platebench.harness.commands.flags import add_data_flag, add_json_flag, add_seed_flag

    p = sub.add_parser("validate", help="check suite and search-space files, best_configs.json, records folders and "
                                        "result bundles",
                       description="One line per problem naming the file, run and field; exit 2 when any. A folder "
                                   "is a storage root holding records/ and runs/ (records schema and vocabulary, "
                                   "complete runs, selection recomputed from the validation records, every run id "
                                   "recomputed from its spec.json, no duplicates, "
                                   "every seed of a method evaluated on the same splits and domains) or a result "
                                   "bundle from `platebench export` (also: data files only, checksums as listed, "
                                   "dataset checksums known, every split of the scheme evaluated). With "
                                   "--reproduce, N runs drawn with --seed (or all) are then re-run from their "
                                   "specs on this machine's CPU, from the --data dataset, and every number they "
                                   "recorded is compared. --json writes the report {path: {kind, problems, ...}}.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--manifest", action="append", default=[], metavar="URL",
                   help="a dataset root or manifest.json: every run on that dataset must have its checksum and be "
                        "evaluated on every split of its scheme (repeat for several datasets)")
    g = p.add_argument_group("reproduction (records folders and bundles)")
    g.add_argument("--reproduce", type=_count, metavar="N|all",
                   help="re-run N runs drawn at random (or all) from their spec.json with this installation, which "
                        "must be the code that made them, into a temporary folder; every record and the done "
                        "marker's selection must come out the same (bit for bit for runs trained on a CPU): "
                        "otherwise exit 2 naming the run and its first differing number")
    add_data_flag(g)
    add_seed_flag(g)
    add_json_flag(p)
    return p


def run(args) -> int:
    from platebench.harness.commands.flags import write_json
    from platebench.harness.errors import HarnessError
    from platebench.harness.results.validate import kind_of, validate_bundle, validate_file, validate_records

    kinds = {path: kind_of(path) for path in args.paths}
    if args.reproduce is not None and not set(kinds.values()) & {"records", "bundle"}:
        raise HarnessError("--reproduce: no records folder or bundle among the paths")
    if args.data and args.reproduce is None:
        raise HarnessError("--data is the dataset of --reproduce, which is not given")
    report, total = {}, 0
    for path, kind in kinds.items():
        if kind == "records":
            problems, summary = validate_records(path, manifests=args.manifest)
        elif kind == "bundle":
            problems, summary = validate_bundle(path, manifests=args.manifest)
        else:
            problems, summary = validate_file(path, kind), {}
        if args.reproduce is not None and kind in ("records", "bundle"):
            if problems:
                problems.append("not reproduced (--reproduce): the problems above come first")
            else:
                summary["reproduced"], problems = _reproduce(path, args)
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


def _reproduce(path: str, args) -> tuple[dict, list[str]]:
    """Re-run runs of `path` and compare (harness/train/reproduce.py): ({seed, chosen, agreed}, problems)."""
    from platebench.harness.commands.session import Progress
    from platebench.harness.train import reproduce

    plan = reproduce.plan(path, args.data, None if args.reproduce == "all" else args.reproduce, args.seed)
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout is the report's
    print(f"{path}: {plan.header()}", file=out, flush=True)
    progress = Progress(sum(len(specs) for _, specs in plan.jobs))
    problems, agreed = reproduce.execute(plan, progress.event)
    for run_id, n in agreed.items():
        exact = "bit for bit" if not plan.tolerance[run_id] else f"within {plan.tolerance[run_id]} (trained on a GPU)"
        print(f"{path}: run {run_id}: reproduced, {n} records and its selection the same {exact}", file=out)
    return {"seed": plan.seed, "chosen": plan.chosen, "agreed": agreed}, problems
