"""`platebench sweep` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("sweep", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench sweep' is not implemented yet")
