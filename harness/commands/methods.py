"""`platebench methods` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("methods", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench methods' is not implemented yet")
