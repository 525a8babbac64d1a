"""`platebench ingest` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("ingest", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench ingest' is not implemented yet")
