"""`platebench leaderboard`: tables, tests and plots from run records.

    platebench leaderboard --records STORAGE [STORAGE ...] --out DIR [--baseline erm]
                           [--selection val|val-loss|last-epoch] [--best-configs FILE] [--allow-mixed-code]

Prints the Markdown tables to stdout and writes leaderboard.{md,csv,json,html} plus PNG plots to DIR. Several
--records (storage roots or bundles from `platebench export`) are merged by run id (harness/sources.py). Incomplete
runs are left out, one stderr line each, and listed in the files (harness/results/completeness.py).
"""

from __future__ import annotations

import json
import sys

from platebench.datasets.storage import describe_error, filesystem, join

from ..errors import HarnessError
from ..results.best_configs import FILE_NAME as BEST_CONFIGS
from ..results.best_configs import parse as parse_best_configs
from ..results.layout import storage_root
from ..results.selection import LEADERBOARD_RULES
from . import flags


def add_parser(sub):
    p = sub.add_parser("leaderboard", help="build leaderboard tables, significance tests and plots from run records",
                       description="Build leaderboard tables (mean ± std over seeds, paired tests against the "
                                   "baseline, Holm correction) and plots from run records; across several datasets "
                                   "or test splits, average ranks per track with a Friedman test and a "
                                   "critical-difference diagram; each method's cost per run next to its accuracy. "
                                   "Several storage roots or bundles are merged by run id: a run found in several "
                                   "counts once; a run id with different numbers, or one dataset and scheme with "
                                   "different checksums, is refused, and so are runs of one method with different code "
                                   "identities unless --allow-mixed-code. Incomplete runs (no done marker, an epoch's "
                                   "records missing, an unreadable records file) are left out and listed. Writes "
                                   "leaderboard.{md,csv,json,html} and PNGs to OUT.")
    flags.add_records_flag(p, several=True)
    flags.add_out_flag(p, required=True)
    flags.add_baseline_flag(p)
    p.add_argument("--selection", choices=list(LEADERBOARD_RULES), default="val",
                   help="epoch selection: best validation accuracy (default), lowest validation loss, or the last "
                        "epoch")
    p.add_argument("--best-configs", metavar="FILE",
                   help=f"JSON {{method: {{\"hparams\": ..., \"trials\": N}}}} fixing each method's config "
                        f"(default: {BEST_CONFIGS} next to records/ when present)")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="build even when runs of one method carry different code identities (refused otherwise); "
                        "their rows are marked")
    return p


def _read_json(url: str, required: bool):
    fs, path = filesystem(url)
    try:
        if not required and not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise describe_error(exc, f"reading {url}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HarnessError(f"{url}: not valid JSON ({exc})") from None


def load_best_configs(records_url: str | list[str], explicit: str | None):
    """The --best-configs file, else best_configs.json beside records/ (the storage root), else None. With several
    sources, the one file found among them; files that differ are refused (pass --best-configs)."""
    if explicit:
        return parse_best_configs(_read_json(explicit, required=True), explicit), explicit
    urls = [records_url] if isinstance(records_url, str) else list(records_url)
    found = []
    for url in urls:
        candidate = join(storage_root(url), BEST_CONFIGS)
        data = _read_json(candidate, required=False)
        if data is not None:
            found.append((candidate, data))
    if not found:
        return None, join(storage_root(urls[0]), BEST_CONFIGS)
    for candidate, data in found[1:]:
        if data != found[0][1]:
            raise HarnessError(f"{found[0][0]} and {candidate} choose different configurations; pass --best-configs "
                               "FILE to say which to use")
    return parse_best_configs(found[0][1], found[0][0]), found[0][0]


def run(args) -> int:
    from ..results import sources
    from ..results.completeness import describe
    from ..results.leaderboard import build_leaderboard
    from ..results.report import to_markdown, write_report

    flags.fill_defaults(args, "baseline")
    merged = sources.load(args.records)
    for skipped in merged.skipped:
        print(f"platebench leaderboard: {describe(skipped)}", file=sys.stderr)
    best, best_src = load_best_configs(args.records, args.best_configs)
    try:
        board = build_leaderboard(merged.records, baseline=args.baseline, rule=args.selection, best_configs=best,
                                  sources=merged.sources, done=merged.done, allow_mixed_code=args.allow_mixed_code,
                                  skipped=merged.skipped)
    except HarnessError as exc:
        if best is not None and str(exc).startswith("best_configs"):
            raise HarnessError(f"{best_src}: {exc}") from None
        raise
    if best is not None:
        board["settings"]["best_configs"] = best_src
    board["settings"]["records"] = list(args.records)
    board["settings"]["sources"] = merged.labels
    board["settings"]["collapsed_duplicates"] = merged.collapsed
    files = write_report(board, args.out)
    sys.stdout.write(to_markdown(board))
    if merged.collapsed:
        print(f"{len(merged.collapsed)} run(s) found in several sources with identical records, counted once",
              file=sys.stderr)
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0
