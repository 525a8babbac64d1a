"""`platebench perf` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("perf", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench perf' is not implemented yet")
