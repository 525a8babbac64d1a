"""`platebench leaderboard` (not implemented yet)."""

from ..errors import HarnessError


def add_parser(sub):
    return sub.add_parser("leaderboard", help="(not implemented yet)")


def run(args) -> int:
    raise HarnessError("'platebench leaderboard' is not implemented yet")
