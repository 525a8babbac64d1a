"""`platebench synth` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("synth", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench synth' is not implemented yet")
