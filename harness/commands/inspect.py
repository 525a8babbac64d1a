"""`platebench inspect` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("inspect", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench inspect' is not implemented yet")
