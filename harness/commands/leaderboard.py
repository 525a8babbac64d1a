"""`platebench leaderboard`: tables, tests and plots from run records.

    platebench leaderboard --records STORAGE --out DIR [--baseline erm] [--selection val|last-epoch]
                           [--best-configs FILE]

Prints the Markdown tables to stdout and writes leaderboard.{md,csv,json,html} plus PNG plots to DIR.
"""

from __future__ import annotations

import json
import sys

from platebench.datasets.storage import describe_error, filesystem, join

from ..errors import HarnessError
from ..records import RECORDS_DIR

BEST_CONFIGS = "best_configs.json"


def add_parser(sub):
    p = sub.add_parser("leaderboard", help="build leaderboard tables, significance tests and plots from run records",
                       description="Build leaderboard tables (mean ± std over seeds, paired tests against the "
                                   "baseline, Holm correction) and plots from run records.")
    p.add_argument("--records", required=True, metavar="URL",
                   help="storage root holding records/ (or the records/ folder itself): local path, file://, s3://")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write leaderboard.{md,csv,json,html} and PNGs")
    p.add_argument("--baseline", default="erm", help="method every row is compared with (default: erm)")
    p.add_argument("--selection", choices=["val", "last-epoch"], default="val",
                   help="epoch selection: best validation accuracy (default) or the last epoch")
    p.add_argument("--best-configs", metavar="FILE",
                   help=f"JSON {{method: {{\"hparams\": ..., \"trials\": N}}}} fixing each method's config "
                        f"(default: {BEST_CONFIGS} next to records/ when present)")
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


def load_best_configs(records_url: str, explicit: str | None):
    """The --best-configs file, else best_configs.json beside records/ (the storage root), else None."""
    if explicit:
        return _read_json(explicit, required=True), explicit
    root = records_url.rstrip("/")
    if root.endswith("/" + RECORDS_DIR) or root == RECORDS_DIR:
        root = root[: -len(RECORDS_DIR)].rstrip("/") or "."
    candidate = join(root, BEST_CONFIGS)
    return _read_json(candidate, required=False), candidate


def run(args) -> int:
    from ..leaderboard import build_leaderboard
    from ..records import read_records
    from ..report import to_markdown, write_report

    records = read_records(args.records)
    if len(records) == 0:
        raise HarnessError(f"no records under {args.records} (expected {RECORDS_DIR}/<run_id>/epoch-*.parquet)")
    best, best_src = load_best_configs(args.records, args.best_configs)
    try:
        board = build_leaderboard(records, baseline=args.baseline, rule=args.selection, best_configs=best)
    except HarnessError as exc:
        if best is not None and str(exc).startswith("best_configs"):
            raise HarnessError(f"{best_src}: {exc}") from None
        raise
    if best is not None:
        board["settings"]["best_configs"] = best_src
    board["settings"]["records"] = args.records
    files = write_report(board, args.out)
    sys.stdout.write(to_markdown(board))
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0
