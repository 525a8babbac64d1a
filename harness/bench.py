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
    hparams: {hparam: value, ...}   (optional: for every method; a method's own entries win)
    methods: [NAME | {NAME: {hparam: value, ...}}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config_files import load_yaml
from .errors import HarnessError

SUITES_DIR = Path(__file__).parent / "suites"
_KEYS = {"name", "dataset", "split_scheme", "backbone", "seeds", "workers", "baseline", "epochs", "hparams",
         "methods"}


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
    hparams: dict = field(default_factory=dict)  # overrides for every method
    methods: dict[str, dict] = field(default_factory=dict)  # name -> hparam overrides

    @classmethod
    def load(cls, path: str | Path) -> Suite:
        return cls.from_dict(load_yaml(path, "suite file"), str(path))

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
        common = data.get("hparams") or {}
        if not isinstance(common, dict):
            raise HarnessError(f"{where}: hparams must be a mapping of hyperparameter: value, got {common!r}")
        return cls(name=str(data["name"]), dataset=dict(ds), split_scheme=str(data["split_scheme"]),
                   backbone=str(data.get("backbone", "resnet-tiny")), seeds=[int(s) for s in data.get("seeds", [0])],
                   workers=int(data.get("workers", 1)), baseline=str(data.get("baseline", "erm")),
                   epochs=data.get("epochs"), hparams=dict(common), methods=methods)


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
        hp = {**suite.hparams, **hp}
        if suite.epochs is not None:
            hp["epochs"] = suite.epochs
        method_specs = build_specs(ds, suite.split_scheme, method, hp, suite.seeds, suite.backbone)
        check_trainable(ds, method_specs[0], suite.workers)
        specs += method_specs
    if suite.baseline not in suite.methods:
        raise HarnessError(f"baseline {suite.baseline!r} is not among the suite's methods {list(suite.methods)}")
    return specs


def time_split(results: list[dict], lanes: dict, wall_s: float) -> dict:
    """Where a bench's lane time went: training, evaluation, start-up and other (seconds summed over lanes).

    Capacity is lanes × wall time. Training counts each shared training once; evaluation is every run's
    own; start-up is each lane's Ray Train start (fit() to its first job) plus each job's set-up (building
    the method and streams); other is the rest (dataset generation, idle lanes, records, the leaderboard).
    """
    fresh = [r for r in results if "timings" in r and not r.get("skipped")]
    per_training: dict[str, dict] = {}
    for r in fresh:
        per_training.setdefault(r["training_id"], r["timings"])
    training = sum(t["training_s"] for t in per_training.values())
    evaluation = sum(r["timings"]["evaluation_s"] for r in fresh)
    startup = lanes["startup_s"] + sum(t["setup_s"] for t in per_training.values())
    capacity = max(1, lanes["lanes"]) * wall_s
    return {"wall_s": wall_s, "lanes": lanes["lanes"], "capacity_s": capacity, "training_s": training,
            "evaluation_s": evaluation, "startup_s": startup,
            "other_s": max(0.0, capacity - training - evaluation - startup),
            "learning_fraction": (training + evaluation) / capacity if fresh else None}


def describe_split(split: dict) -> str:
    if split["learning_fraction"] is None:
        return "nothing trained or evaluated"
    cap = split["capacity_s"]
    parts = ", ".join(f"{name} {split[f'{name}_s'] / cap:.0%}" for name in ("training", "evaluation", "startup",
                                                                           "other"))
    return f"time of {split['lanes']} lane(s): {parts}"


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
