"""A benchmark suite: dataset × methods × seeds, run concurrently, summarised as a leaderboard.

Suite file (YAML, strict: unknown keys are errors):
    name: str
    dataset: {preset: NAME, seed: INT} | {url: URL}
    split_scheme: str
    backbone: str
    seeds: [int, ...]
    workers: int
    baseline: str
    epochs: int            (optional: overrides every method's epochs)
    methods: [NAME | {NAME: {hparam: value, ...}}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import HarnessError

SUITES_DIR = Path(__file__).parent / "suites"
_KEYS = {"name", "dataset", "split_scheme", "backbone", "seeds", "workers", "baseline", "epochs", "methods"}


@dataclass
class Suite:
    name: str
    dataset: dict
    split_scheme: str
    backbone: str = "resnet-tiny"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 1
    baseline: str = "erm"
    epochs: int | None = None
    methods: dict[str, dict] = field(default_factory=dict)  # name -> hparam overrides

    @classmethod
    def load(cls, path: str | Path) -> Suite:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise HarnessError(f"{where}: suite file not found") from None
        except yaml.YAMLError as exc:
            raise HarnessError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data, where: str) -> Suite:
        if not isinstance(data, dict):
            raise HarnessError(f"{where}: a suite is a mapping")
        unknown = set(data) - _KEYS
        if unknown:
            raise HarnessError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_KEYS)})")
        for key in ("name", "dataset", "split_scheme", "methods"):
            if key not in data:
                raise HarnessError(f"{where}: missing key {key!r}")
        ds = data["dataset"]
        if not isinstance(ds, dict) or not ({"preset"} <= set(ds) <= {"preset", "seed"} or set(ds) == {"url"}):
            raise HarnessError(f"{where}: dataset must be {{preset: NAME, seed: N}} or {{url: URL}}, got {ds!r}")
        methods: dict[str, dict] = {}
        for i, item in enumerate(data["methods"] or []):
            if isinstance(item, str):
                methods[item] = {}
            elif isinstance(item, dict) and len(item) == 1:
                (name, hp), = item.items()
                if hp is not None and not isinstance(hp, dict):
                    raise HarnessError(f"{where}: methods[{i}].{name}: hyperparameters must be a mapping")
                methods[name] = dict(hp or {})
            else:
                raise HarnessError(f"{where}: methods[{i}] must be a name or {{name: {{hparams}}}}, got {item!r}")
        if not methods:
            raise HarnessError(f"{where}: no methods")
        return cls(name=str(data["name"]), dataset=dict(ds), split_scheme=str(data["split_scheme"]),
                   backbone=str(data.get("backbone", "resnet-tiny")), seeds=[int(s) for s in data.get("seeds", [0])],
                   workers=int(data.get("workers", 1)), baseline=str(data.get("baseline", "erm")),
                   epochs=data.get("epochs"), methods=methods)


def default_suite() -> Suite:
    return Suite.load(SUITES_DIR / "quickstart.yaml")


def dataset_url(suite: Suite, out: Path) -> str:
    if "url" in suite.dataset:
        return suite.dataset["url"]
    return str((out / "data" / f"{suite.dataset['preset']}-seed{int(suite.dataset.get('seed', 0))}").resolve())


def ensure_dataset(suite: Suite, out: Path) -> str:
    """The suite's dataset URL; a preset is generated first when its manifest is absent."""
    url = dataset_url(suite, out)
    if "url" in suite.dataset or (Path(url) / "manifest.json").exists():
        return url
    from .synth_job import generate

    generate(suite.dataset["preset"], url, seed=int(suite.dataset.get("seed", 0)))
    return url


def build_all_specs(suite: Suite, ds) -> list:
    from .runspec import build_specs, check_trainable

    specs = []
    for method, hp in suite.methods.items():
        hp = dict(hp)
        if suite.epochs is not None:
            hp["epochs"] = suite.epochs
        method_specs = build_specs(ds, suite.split_scheme, method, hp, suite.seeds, suite.backbone)
        check_trainable(ds, method_specs[0], suite.workers)
        specs += method_specs
    if suite.baseline not in suite.methods:
        raise HarnessError(f"baseline {suite.baseline!r} is not among the suite's methods {list(suite.methods)}")
    return specs


README_START = "<!-- quickstart-leaderboard:start -->"
README_END = "<!-- quickstart-leaderboard:end -->"


def readme_block(board: dict, wall_seconds: float, command: str, splits: tuple[str, ...] = ("test",)) -> str:
    """The README's quickstart leaderboard: the test-split tables (both tracks) of `board`, plus provenance."""
    import os
    import time

    from .plots import table_title
    from .report import _md_table, table_matrix

    lines = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
             f"wall time {wall_seconds / 60:.1f} min (dataset generation included). Accuracy (%) on the "
             f"held-out batches at each run's best validation epoch, mean ± std (n seeds); Δ and tests vs "
             f"`{board['settings']['baseline']}` on the same seeds (full tables, plots and the other splits in "
             f"the output folder's `leaderboard.md`).", ""]
    for t in board["tables"]:
        if t["split"] in splits:
            lines += [f"**{table_title(t)}**", "", *_md_table(*table_matrix(t)), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path: str, block: str) -> None:
    """Replace the text between the quickstart-leaderboard markers of `path` (refuses if they are missing)."""
    text = Path(path).read_text()
    if README_START not in text or README_END not in text:
        raise HarnessError(f"{path}: no {README_START} ... {README_END} markers to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    Path(path).write_text(f"{head}{README_START}\n{block}{README_END}{tail}")
