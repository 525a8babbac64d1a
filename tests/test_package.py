"""Packaging: one distribution, three code folders under `platebench.*`, nothing shadowing `datasets`."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_platebench_datasets_does_not_shadow_or_get_shadowed_by_top_level_datasets(tmp_path):
    """A foreign top-level `datasets` (HuggingFace's name) earlier on sys.path must not replace ours, and our
    install must not provide a top-level `datasets`. Run from a folder outside the repo, as a user would."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'foreign datasets'\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import datasets, platebench.datasets as ours, platebench.datasets.shards;"
        "print(datasets.MARKER); print(ours.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "foreign datasets"
    assert Path(out[1]).resolve() == (REPO / "datasets" / "__init__.py").resolve() or "site-packages" in out[1]
    code = "import importlib.util; s = importlib.util.find_spec('datasets'); print(s.origin if s else None)"
    origin = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert origin == "None" or Path(origin).resolve() != (REPO / "datasets" / "__init__.py").resolve()
    assert not (REPO / "__init__.py").exists()  # `platebench` stays a namespace package


def test_every_code_folder_is_a_listed_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (REPO / folder).rglob("*.py"):
            rel = init.parent.relative_to(REPO / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([pkg, *rel.parts]))
    missing = {p for p in found if p not in listed and not re.search(r"tune_spaces", p)}
    assert not missing, f"folders with code missing from pyproject packages: {sorted(missing)}"


def test_console_script_and_builtin_entry_points_are_declared():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["project"]["scripts"]["platebench"] == "platebench.harness.cli:main"
    eps = cfg["project"]["entry-points"]["platebench.methods"]
    assert {"erm", "adabn", "ben", "arm-bn", "cs-arm-bn", "mixstyle", "dsu", "advstyle", "advstyle+tta", "abra",
            "abra+tta", "dann", "coral", "groupdro", "irm", "tvn"} <= set(eps)
