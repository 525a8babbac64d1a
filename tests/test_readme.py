"""The README is the user's entry point: CI runs exactly its commands, and its examples stay valid."""

import re
import shlex
from pathlib import Path

import pytest
from platebench.harness.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readmes_install_and_test_commands():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    ci = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd ", "apt-get "))]  # apt-get: Chromium
    install, test = ci
    first, second = _bash_blocks()[:2]
    assert first.strip().startswith(install + " && ")  # the README's first command = install + main job
    assert second.strip() == test


def _platebench_commands() -> list[str]:
    out = []
    for block in _bash_blocks():
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            for part in re.split(r";|&&|\|", line):
                part = part.strip()
                match = re.match(r"^(?:\.venv/bin/)?platebench\s+(.*)$", part)
                if match:
                    out.append(match.group(1))
    return out


COMMANDS = _platebench_commands()


def test_the_readme_shows_every_command():
    used = {shlex.split(c)[[i for i, t in enumerate(shlex.split(c)) if not t.startswith("-")][0]] for c in COMMANDS}
    assert {"synth", "inspect", "methods", "run", "bench", "leaderboard", "sweep", "ingest", "perf", "validate",
            "export", "analyze"} <= used


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_example_parses(command):
    build_parser().parse_args(shlex.split(command))  # argparse exits (SystemExit) on a wrong flag
