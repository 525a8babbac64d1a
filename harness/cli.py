"""`platebench` command line. Each subcommand lives in `platebench.harness.commands.<name>` and
exposes `add_parser(subparsers)` plus `run(args) -> int`; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ["synth", "inspect", "methods", "run", "bench", "leaderboard", "sweep", "ingest", "perf", "validate",
            "export", "analyze", "export-weights"]


def _add_storage_flags(p: argparse.ArgumentParser, default=None) -> None:
    """The storage flags, accepted before the command and after it (there `default=SUPPRESS`, so a flag given
    before the command is not reset by the subcommand's own default)."""
    g = p.add_argument_group("object storage (also read from PLATEBENCH_S3_* / AWS_* environment variables)")
    g.add_argument("--s3-endpoint", default=default, help="S3 endpoint URL, e.g. http://127.0.0.1:9000")
    g.add_argument("--s3-anon", action="store_true", default=default if default is not None else False,
                   help="anonymous S3 access (public buckets such as the JUMP gallery)")
    g.add_argument("--s3-region", default=default, help="S3 region (default us-east-1)")


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, `platebench COMMAND: error: ...` (exit 2), without the usage
    block argparse prints first (`--help` shows it). Subcommand parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="platebench", description="Benchmark batch-effect correction methods on cell-painting plates.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_storage_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"platebench.harness.commands.{name.replace('-', '_')}")
        p = module.add_parser(sub)
        _add_storage_flags(p, default=argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def _export_storage_flags(args) -> None:
    # Environment, so Ray workers (via runtime_env) and every filesystem helper see the same settings.
    if args.s3_endpoint:
        os.environ["PLATEBENCH_S3_ENDPOINT"] = args.s3_endpoint
    if args.s3_anon:
        os.environ["PLATEBENCH_S3_ANON"] = "1"
    if args.s3_region:
        os.environ["PLATEBENCH_S3_REGION"] = args.s3_region


def main(argv: list[str] | None = None) -> int:
    from .errors import USER_ERRORS

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what was asked, for commands that record their own command line
    _export_storage_flags(args)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"platebench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"platebench {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
