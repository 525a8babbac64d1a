"""`platebench bench` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("bench", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench bench' is not implemented yet")
