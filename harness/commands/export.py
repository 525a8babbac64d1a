"""`platebench export`: a result bundle (data only) of finished runs, for a leaderboard maintainer.

    platebench export --records STORAGE --out DIR [--methods NAME ...] [--dataset NAME]
"""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands import flags

    p = sub.add_parser("export", help="write a result bundle (records, run specs, done markers, dataset and code "
                                      "identity; never weights) for someone else's leaderboard",
                       description="Copy the finished runs under STORAGE (or its records/ folder) into the bundle "
                                   "folder OUT, new or empty: records as Parquet, run specs and done markers, the "
                                   "dataset checksum and split-scheme definition, the code identity of every run and "
                                   "the environment, described by OUT/bundle.json. No weights, checkpoints or "
                                   "pickles. Check it with `platebench validate OUT`.")
    flags.add_records_flag(p)
    flags.add_out_flag(p, required=True)
    flags.add_methods_flag(p)
    p.add_argument("--dataset", metavar="NAME", help="only runs on this dataset (its manifest name)")
    return p


def run(args) -> int:
    import sys

    from platebench.harness.results.bundle import export_bundle

    b = export_bundle(args.records, args.out, methods=args.methods, dataset=args.dataset)
    methods = sorted({r["method"] for r in b["runs"]})
    for x in b["left_out"]:
        print(f"left out run {x['run_id']}: {x['why']}", file=sys.stderr)
    for d in b["datasets"]:
        if d["scheme"] is None:
            print(f"dataset {d['dataset']} ({d['split_scheme']}): manifest not readable with checksum "
                  f"{d['dataset_checksum'][:16]}…, bundle lists the checksum only", file=sys.stderr)
    print(f"exported {len(b['runs'])} runs ({', '.join(methods)}) on "
          f"{', '.join(sorted({d['dataset'] + '/' + d['split_scheme'] for d in b['datasets']}))} to {args.out} "
          f"({len(b['files'])} files); check it with: platebench validate {args.out}")
    return 0
