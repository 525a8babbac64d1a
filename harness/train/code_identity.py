"""The code a run's numbers come from: the harness version plus a hash of the source that trains and
evaluates it (the method's module and every platebench module it imports, and the harness's training and
evaluation path), and the git commit when the package runs from a checkout.

The hash enters a run's identity, so a fix to a method or to the training loop gives new run ids: the old
results are kept but never silently reused as if the new code had made them. The commit does not enter the
identity (a README edit must not invalidate results); it is recorded beside it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

from .. import __version__
from .tracking import git_commit

# The harness modules every training and evaluation runs through (stream → batches → steps → evaluation).
TRAINING_PATH = (
    "platebench.harness.train.lane_worker", "platebench.harness.train.lane", "platebench.harness.train.job",
    "platebench.harness.train.job_state", "platebench.harness.train.epochs",
    "platebench.harness.train.selectable_epochs", "platebench.harness.train.run_done",
    "platebench.harness.train.evaluate", "platebench.harness.data.stream",
    "platebench.harness.data.rebatch", "platebench.harness.data.batching", "platebench.harness.data.augment",
    "platebench.harness.train.schedule", "platebench.harness.data.source", "platebench.datasets.shards",
)
_OWN_PACKAGES = ("platebench.methods", "platebench.harness", "platebench.datasets")


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _imports(name: str, path: Path) -> set[str]:
    """Modules of platebench (or of the method's own package) that `name` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = name.split(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from .blocks import bn` imports the submodule blocks.bn
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c.startswith(_OWN_PACKAGES) or c.split(".")[0] == top and top != "platebench":
                if _module_file(c) is not None:
                    found.add(c)
    return found


@functools.cache
def _source_hash(roots: tuple[str, ...]) -> str:
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        todo.extend(_imports(name, path) - set(seen))
    blob = "\n".join(f"{k} {v}" for k, v in sorted(seen.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_identity(method_cls: type) -> dict:
    """{"version", "source"}: what enters a run's identity for a method class (see the module docstring)."""
    return {"version": __version__, "source": _source_hash((method_cls.__module__, *TRAINING_PATH))}


def code_label(code: dict) -> str:
    """The short form recorded with every record row, e.g. "0.2.0+3f2a9c1d0b4e5f67"."""
    return f"{code['version']}+{code['source']}"


@functools.lru_cache(maxsize=1)
def commit() -> str | None:
    return git_commit()
