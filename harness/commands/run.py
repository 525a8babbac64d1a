"""`platebench run` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("run", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench run' is not implemented yet")
