"""docs/architecture.md stays true to the tree: it names every module of harness/ (and no module that is gone)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text()


def _modules() -> set[str]:
    return {str(p.relative_to(REPO)) for p in (REPO / "harness").rglob("*.py") if p.name != "__init__.py"}


def _mentioned(path: str) -> bool:
    """`harness/x/y.py` in full, or `y.py` in the bullet list of its package's section."""
    if path in DOC:
        return True
    package, name = path.rsplit("/", 1)
    sections = re.split(r"\n#+ ", DOC)
    return any(f"`{package}/" in s and f"`{name}`" in s for s in sections)


def test_every_harness_module_is_named():
    missing = sorted(m for m in _modules() if not _mentioned(m))
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_no_module_named_that_does_not_exist():
    named = set(re.findall(r"harness/[\w/]+\.py", DOC))
    gone = sorted(n for n in named if not (REPO / n).exists())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
