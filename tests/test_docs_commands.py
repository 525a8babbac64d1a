"""docs/commands.md shows each command's usage as the parser has it: every flag it lists exists, and no flag of
the parser is missing from it (the storage flags every command takes are described once, in its conventions)."""

import argparse
import re
from pathlib import Path

import pytest
from platebench.harness.cli import build_parser

pytestmark = pytest.mark.unit

DOC = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
STORAGE_FLAGS = {"--s3-endpoint", "--s3-anon", "--s3-region"}


def _usages() -> dict[tuple[str, ...], set[str]]:
    """{('perf', 'data'): {'--data', ...}} from the ```text usage blocks."""
    out = {}
    for block in re.findall(r"```text\n(.*?)```", DOC, flags=re.S):
        for usage in re.split(r"(?m)^(?=usage: )", block):
            m = re.match(r"usage: platebench ((?:[a-z][\w-]* ?)+)", usage)
            if m:
                out[tuple(m.group(1).split())] = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", usage))
    return out


def _parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    def subparsers(p):
        return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]

    out = {}
    for top in subparsers(build_parser()):
        for name, p in top.choices.items():
            nested = subparsers(p)
            if nested:
                out.update({(name, sub): q for a in nested for sub, q in a.choices.items()})
            else:
                out[(name,)] = p
    return out


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings if s.startswith("--")} - STORAGE_FLAGS - {"--help"}


@pytest.mark.parametrize("command", sorted(_parsers()), ids=" ".join)
def test_usage_block_lists_exactly_the_parsers_flags(command):
    usages = _usages()
    assert command in usages, f"docs/commands.md has no usage block for `platebench {' '.join(command)}`"
    parser_flags = _flags(_parsers()[command])
    assert usages[command] == parser_flags, (
        f"platebench {' '.join(command)}: only in the doc {sorted(usages[command] - parser_flags)}, "
        f"only in the parser {sorted(parser_flags - usages[command])}")
