"""YAML configuration files (suites, search spaces) read with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import HarnessError


def load_yaml(path: str | Path, what: str):
    """The parsed YAML at `path`; a missing file or bad YAML is a HarnessError naming it (`what`: e.g. "suite file")."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
