"""Argument types of the command line: a bad value is one argparse error line naming the flag (exit 2),
before anything starts."""

from __future__ import annotations

import argparse


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _float_above(minimum: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"must be > {minimum:g}, got {value:g}")
        return value

    parse.__name__ = f"number > {minimum:g}"
    return parse


positive_int = _int_at_least(1)  # --workers, --epochs, --trials, --num-cpus, --max-concurrent
non_negative_int = _int_at_least(0)  # --seeds, --max-failures, --cache-mb
positive_float = _float_above(0.0)  # --cpus-per-worker


def add_seed_flag(p, what: str) -> None:
    """`--seed N`, one meaning in every command: the one seed of what the command draws (`what`); commands
    that train several seeds take `--seeds` (add_seeds_flag)."""
    p.add_argument("--seed", type=non_negative_int, default=0, help=f"seeds {what} (default 0)")


def add_seeds_flag(p, default=None) -> None:
    """`--seeds N [N ...]`: the training seeds, one run per seed and method."""
    p.add_argument("--seeds", nargs="+", type=non_negative_int, default=default,
                   help="training seeds, one run per seed and method" + (f" (default {default})" if default else ""))


def add_json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """`--json [FILE]`, one meaning in every command: write `what` as JSON to FILE, or to stdout without FILE."""
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help=f"write {what} as JSON to FILE (stdout when FILE is omitted)")


def write_json(payload, dest: str) -> None:
    """The destination of --json: "-" is stdout."""
    import json
    from pathlib import Path

    text = json.dumps(payload, indent=1, default=str)
    if dest == "-":
        print(text)
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text(text + "\n")


def parse_pairs(flag: str, pairs: list[str] | None) -> dict[str, str]:
    """KEY=VALUE strings of a flag (`--hparams`, `--set`): values stay strings, their owner coerces and checks
    them. A pair without '=' or a key is one error line naming the flag."""
    from ..errors import HarnessError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def add_ray_flags(p) -> None:
    """--address / --num-cpus: joining a cluster or sizing the local Ray, the same in every command."""
    p.add_argument("--address", help="Ray cluster address (e.g. auto on the head node); default: start a local "
                                     "loopback-only Ray")
    p.add_argument("--num-cpus", type=positive_int, help="logical CPUs of a local Ray (default: cores + 1)")
