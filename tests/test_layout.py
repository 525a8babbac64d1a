"""The code's layout, read from the source with `ast` (nothing is imported): no import cycle among platebench modules
(imports inside functions count), no use of another module's `_`-private names, methods/ and datasets/ never import
the harness, datasets/ never imports torch or Ray, methods/ never imports Ray or MLflow.

Imports under `if TYPE_CHECKING:` never run and are left out; `importlib.import_module(f"pkg.{name}")` counts as an
import of every module in pkg.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"harness": "platebench.harness", "methods": "platebench.methods", "datasets": "platebench.datasets"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # platebench module -> first line importing it
    external: dict[str, int] = field(default_factory=dict)  # top-level third-party name -> first line


def _module_name(folder: str, path: Path) -> str:
    parts = path.relative_to(REPO / folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((FOLDERS[folder], *parts))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (they never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


@cache
def modules() -> dict[str, Module]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            name = _module_name(folder, path)
            found[name] = Module(name, path, path.name == "__init__.py", ast.parse(path.read_text(), str(path)))
    for mod in found.values():
        _collect_imports(mod, found)
    return found


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _target(name: str, known: dict[str, Module]) -> str | None:
    """The platebench module `name` is, or lies in (an imported class or function names its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _collect_imports(mod: Module, known: dict[str, Module]) -> None:
    skipped = _type_checking_only(mod.tree)

    def add(target: str | None, line: int) -> None:
        if target and target != mod.name:
            mod.imports.setdefault(target, line)

    for node in ast.walk(mod.tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("platebench."):
                    add(_target(alias.name, known), node.lineno)
                else:
                    mod.external.setdefault(alias.name.partition(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(mod, node)
            if not source.startswith("platebench."):
                mod.external.setdefault(source.partition(".")[0], node.lineno)
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                add(_target(f"{source}.{alias.name}", known), node.lineno)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value.startswith("platebench."):
                    add(_target(arg.value, known), node.lineno)
                else:
                    mod.external.setdefault(arg.value.partition(".")[0], node.lineno)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)  # f"platebench.harness.commands.{name}": any module there
                if prefix.startswith("platebench.") and prefix.endswith("."):
                    for other in known:
                        if other.startswith(prefix) and "." not in other[len(prefix):]:
                            add(other, node.lineno)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component with more than one module."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle_in(component, graph) for component in components]


def _a_cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _where(mod: Module, line: int) -> str:
    return f"{mod.path.relative_to(REPO)}:{line}"


def _private_names_defined(mod: Module) -> set[str]:
    """`_names` this module defines: module globals, class members, and attributes it assigns (`x._n = ...`)."""
    names = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:  # argparse's set_defaults(_run=...) makes args._run
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def _private_members(mod: Module) -> set[str]:
    """`_names` reachable as `obj._name` on what this module defines: class members and attributes it assigns."""
    names = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(stmt.name)
                elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


def _private_reaches(mod: Module, known: dict[str, Module], private_attrs: dict[str, set[str]]) -> list[str]:
    found = []
    bound = {}  # local name -> the platebench module it came from (a module, or a name imported from one)
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve_from(mod, node)
            if not source.startswith("platebench."):
                continue
            for alias in node.names:
                target = _target(f"{source}.{alias.name}", known)
                if _is_private(alias.name) and target != mod.name:
                    found.append(f"{_where(mod, node.lineno)}: from {source} import {alias.name}")
                if target:
                    bound[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("platebench.") and alias.asname and _target(alias.name, known):
                    bound[alias.asname] = _target(alias.name, known)
    own = _private_names_defined(mod)
    for node in ast.walk(mod.tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        text = ast.unparse(node.value)
        root = text.partition(".")[0]
        if root in ("self", "cls"):
            continue
        if text.startswith("platebench.") or bound.get(root, mod.name) != mod.name:
            owner = _target(text, known) if text.startswith("platebench.") else bound[root]
            found.append(f"{_where(mod, node.lineno)}: {text}.{node.attr} (a private name of {owner})")
        elif node.attr not in own and private_attrs.get(node.attr, set()) - {mod.name}:
            owners = ", ".join(sorted(private_attrs[node.attr] - {mod.name}))
            found.append(f"{_where(mod, node.lineno)}: {text}.{node.attr} (a private name of {owners})")
    return found


def test_the_walk_finds_the_code():
    found = modules()
    assert {"platebench.harness.cli", "platebench.methods.base", "platebench.datasets.shards"} <= set(found)
    assert len(found) > 100
    assert "platebench.harness.results.records" in found["platebench.harness.results.selection"].imports


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_checks_see_lazy_imports_and_private_reaches():
    sources = {
        "platebench.harness.x.a": "class A:\n    def _hidden(self): ...\ndef _helper(): ...\n",
        "platebench.harness.x.b": ("def f(obj):\n    from .a import A, _helper\n    from . import a\n"
                                   "    return A._hidden, obj._hidden, a._helper\n"),
        "platebench.harness.x": "",
    }
    fake = {name: Module(name, REPO / "harness" / f"{name.replace('.', '_')}.py", name == "platebench.harness.x",
                         ast.parse(text)) for name, text in sources.items()}
    for mod in fake.values():
        _collect_imports(mod, fake)
    assert set(fake["platebench.harness.x.b"].imports) == {"platebench.harness.x.a"}  # inside a function
    private_attrs = {"_hidden": {"platebench.harness.x.a"}}
    found = _private_reaches(fake["platebench.harness.x.b"], fake, private_attrs)
    assert [line.split(": ", 1)[1] for line in found] == [
        "from platebench.harness.x.a import _helper",
        "A._hidden (a private name of platebench.harness.x.a)",
        "obj._hidden (a private name of platebench.harness.x.a)",
        "a._helper (a private name of platebench.harness.x.a)",
    ]


def test_no_import_cycle_among_platebench_modules():
    found = modules()
    graph = {name: set(mod.imports) for name, mod in found.items()}
    problems = []
    for cycle in _cycles(graph):
        steps = [f"{a} ({_where(found[a], found[a].imports[b])})" for a, b in zip(cycle, cycle[1:])]
        problems.append(" -> ".join([*steps, cycle[-1]]))
    assert not problems, "import cycles (each: module (line importing the next) -> ...):\n" + "\n".join(problems)


def test_no_module_uses_another_modules_private_names():
    found = modules()
    private_attrs: dict[str, set[str]] = {}
    for mod in found.values():
        for name in _private_members(mod):
            private_attrs.setdefault(name, set()).add(mod.name)
    problems = [p for mod in found.values() for p in _private_reaches(mod, found, private_attrs)]
    assert not problems, "uses of another module's private names:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder,forbidden", [
    ("methods", {"platebench.harness", "ray", "mlflow"}),
    ("datasets", {"platebench.harness", "platebench.methods", "torch", "ray", "mlflow"}),
])
def test_lower_layers_never_import_upper_ones(folder, forbidden):
    problems = []
    for mod in modules().values():
        if mod.name != FOLDERS[folder] and not mod.name.startswith(FOLDERS[folder] + "."):
            continue
        used = {**mod.external, **mod.imports}
        for name, line in sorted(used.items()):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                problems.append(f"{_where(mod, line)}: imports {name}")
    assert not problems, f"{folder}/ must not import {', '.join(sorted(forbidden))}:\n" + "\n".join(problems)
