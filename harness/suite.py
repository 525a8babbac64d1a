"""A benchmark suite: dataset × methods × seeds, run in lanes, summarised as a leaderboard.

Suite file (YAML, strict: unknown keys, wrong types and out-of-range values are errors naming the key):
    name: str
    dataset: {preset: NAME, seed: INT} | {url: URL} | {expects: MANIFEST NAME}   (expects: --data gives it)
    split_scheme: str
    backbone: str
    seeds: [int >= 0, ...]
    workers: int >= 1
    baseline: str
    epochs: int >= 1       (optional: overrides every method's epochs)
    hparams: {hparam: value, ...}   (optional: for every method; a method's own entries win)
    selection: val | val-loss | last-epoch   (optional: the leaderboard's epoch selection, default val)
    eval: {tta_batch_sizes: [int >= 0, ...], control_counts: [int >= 1, ...]}   (optional: the TTA sweeps)
    precision: fp32 | bf16-mixed | fp16-mixed   (optional, default fp32: a run setting, methods/precision.py)
    compile: bool   (optional, default false: torch.compile of the backbones, methods/compiling.py)
    methods: [NAME | {NAME: {hparam: value, ..., backbone: NAME}}, ...]
A method's `backbone` replaces the suite's for its runs (e.g. a pretrained encoder's); `--backbone` replaces
only the suite's. A hyperparameter whose value is `null` is left to the user (e.g. a pretrained encoder's file,
which a suite cannot ship): the suite resolves and validates, but runs only once `--hparams METHOD.KEY=VALUE`
gives it (`require_given`).
Built-in suites live in harness/suites/ and run by name (`platebench bench --suite NAME`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from platebench.methods.backbones import DEFAULT_BACKBONE
from platebench.methods.precision import DEFAULT_PRECISION, PRECISIONS

from .config_files import load_yaml
from .errors import HarnessError
from .train.runspec import EvalProtocol, resolve_run_hparams

SUITES_DIR = Path(__file__).parent / "suites"
_KEYS = {"name", "dataset", "split_scheme", "backbone", "seeds", "workers", "baseline", "epochs", "hparams",
         "selection", "eval", "methods", "precision", "compile"}
_DATASET_FORMS = ({"preset"}, {"preset", "seed"}, {"url"}, {"expects"})


def _int(where: str, key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HarnessError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(where: str, key: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise HarnessError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _ints(where: str, key: str, value, minimum: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise HarnessError(f"{where}: {key} must be a non-empty list of integers, got {value!r}")
    return [_int(where, f"{key}[{i}]", v, minimum) for i, v in enumerate(value)]


@dataclass
class Suite:
    name: str
    dataset: dict
    split_scheme: str
    backbone: str = DEFAULT_BACKBONE
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 1
    baseline: str = "erm"
    epochs: int | None = None
    hparams: dict = field(default_factory=dict)  # overrides for every method
    selection: str = "val"
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    methods: dict[str, dict] = field(default_factory=dict)  # name -> hparam overrides (None: left to the user)
    expects: str | None = None  # the manifest name a dataset given with --data must have
    precision: str = DEFAULT_PRECISION  # run settings of every run
    compile: bool = False
    backbones: dict[str, str] = field(default_factory=dict)  # name -> its own backbone, instead of `backbone`

    def backbone_of(self, method: str) -> str:
        return self.backbones.get(method, self.backbone)

    @classmethod
    def load(cls, path: str | Path) -> Suite:
        return cls.from_dict(load_yaml(path, "suite file"), str(path))

    @classmethod
    def from_dict(cls, data, where: str) -> Suite:
        from .results.selection import LEADERBOARD_RULES

        if not isinstance(data, dict):
            raise HarnessError(f"{where}: a suite is a mapping")
        unknown = set(data) - _KEYS
        if unknown:
            raise HarnessError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_KEYS)})")
        for key in ("name", "dataset", "split_scheme", "methods"):
            if key not in data:
                raise HarnessError(f"{where}: missing key {key!r}")
        ds = data["dataset"]
        if not isinstance(ds, dict) or set(ds) not in _DATASET_FORMS:
            raise HarnessError(f"{where}: dataset must be {{preset: NAME, seed: N}}, {{url: URL}} or "
                               f"{{expects: NAME}}, got {ds!r}")
        for key, value in ds.items():
            _int(where, "dataset.seed", value, 0) if key == "seed" else _str(where, f"dataset.{key}", value)
        if not isinstance(data["methods"], list):
            raise HarnessError(f"{where}: methods must be a list of names or {{name: {{hparams}}}}, "
                               f"got {data['methods']!r}")
        methods: dict[str, dict] = {}
        backbones: dict[str, str] = {}
        for i, item in enumerate(data["methods"]):
            if isinstance(item, str):
                methods[item] = {}
            elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
                (name, hp), = item.items()
                if hp is not None and not isinstance(hp, dict):
                    raise HarnessError(f"{where}: methods[{i}].{name}: hyperparameters must be a mapping")
                methods[name] = dict(hp or {})
                if "backbone" in methods[name]:
                    backbones[name] = _str(where, f"methods[{i}].{name}.backbone", methods[name].pop("backbone"))
            else:
                raise HarnessError(f"{where}: methods[{i}] must be a name or {{name: {{hparams}}}}, got {item!r}")
        if not methods:
            raise HarnessError(f"{where}: no methods")
        common = data.get("hparams") or {}
        if not isinstance(common, dict):
            raise HarnessError(f"{where}: hparams must be a mapping of hyperparameter: value, got {common!r}")
        if any(v is None for v in common.values()):
            raise HarnessError(f"{where}: hparams: a value left to the user (null) belongs in one method's entry")
        selection = data.get("selection", "val")
        if selection not in LEADERBOARD_RULES:
            raise HarnessError(f"{where}: selection must be one of {', '.join(LEADERBOARD_RULES)}, got {selection!r}")
        ev = data.get("eval") or {}
        if not isinstance(ev, dict) or set(ev) - {"tta_batch_sizes", "control_counts"}:
            raise HarnessError(f"{where}: eval takes tta_batch_sizes and control_counts, got {ev!r}")
        base = EvalProtocol()
        protocol = EvalProtocol(
            tta_batch_sizes=tuple(_ints(where, "eval.tta_batch_sizes", ev["tta_batch_sizes"], 0))
            if "tta_batch_sizes" in ev else base.tta_batch_sizes,
            control_counts=tuple(_ints(where, "eval.control_counts", ev["control_counts"], 1))
            if "control_counts" in ev else base.control_counts)
        epochs = data.get("epochs")
        precision, compile_ = data.get("precision", DEFAULT_PRECISION), data.get("compile", False)
        if precision not in PRECISIONS:
            raise HarnessError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(compile_, bool):
            raise HarnessError(f"{where}: compile must be true or false, got {compile_!r}")
        return cls(name=_str(where, "name", data["name"]), dataset=dict(ds),
                   split_scheme=_str(where, "split_scheme", data["split_scheme"]),
                   backbone=_str(where, "backbone", data.get("backbone", DEFAULT_BACKBONE)),
                   seeds=_ints(where, "seeds", data.get("seeds", [0]), 0),
                   workers=_int(where, "workers", data.get("workers", 1), 1),
                   baseline=_str(where, "baseline", data.get("baseline", "erm")),
                   epochs=None if epochs is None else _int(where, "epochs", epochs, 1), hparams=dict(common),
                   selection=selection, eval=protocol, methods=methods, expects=ds.get("expects"),
                   backbones=backbones, precision=precision, compile=compile_)


def builtin_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def named_suite(name: str) -> Suite:
    suites = builtin_suites()
    if name not in suites:
        import difflib

        close = difflib.get_close_matches(name, list(suites), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise HarnessError(f"unknown suite {name!r}{hint} (built-in: {', '.join(suites)})")
    return Suite.load(suites[name])


def default_suite() -> Suite:
    return named_suite("quickstart")


def dataset_url(suite: Suite, out: Path) -> str:
    if "url" in suite.dataset:
        return suite.dataset["url"]
    if "expects" in suite.dataset:
        raise HarnessError(f"suite {suite.name!r} runs on the {suite.dataset['expects']!r} dataset: give its "
                           f"plate shards with --data URL (see docs/datasets.md)")
    return str((out / "data" / f"{suite.dataset['preset']}-seed{int(suite.dataset.get('seed', 0))}").resolve())


def ensure_dataset(suite: Suite, out: Path) -> str:
    """The suite's dataset URL; a preset is generated first when its manifest is absent."""
    url = dataset_url(suite, out)
    if "url" in suite.dataset or (Path(url) / "manifest.json").exists():
        return url
    from .prepare.synth import generate

    generate(suite.dataset["preset"], url, seed=int(suite.dataset.get("seed", 0)))
    return url


def build_all_specs(suite: Suite, ds) -> list:
    from .train.runspec import build_specs, check_trainable

    if suite.expects and ds.manifest.name != suite.expects:
        raise HarnessError(f"suite {suite.name!r} expects the {suite.expects!r} dataset, but {ds.url} holds "
                           f"{ds.manifest.name!r}")
    require_given(suite)
    specs = []
    for method in suite.methods:
        method_specs = build_specs(ds, suite.split_scheme, method, method_overrides(suite, method), suite.seeds,
                                   suite.backbone_of(method), suite.eval, precision=suite.precision,
                                   compile=suite.compile)
        check_trainable(ds, method_specs[0], suite.workers)
        specs += method_specs
    if suite.baseline not in suite.methods:
        raise HarnessError(f"baseline {suite.baseline!r} is not among the suite's methods {list(suite.methods)}")
    return specs


def time_split(results: list[dict], lanes: dict, wall_s: float) -> dict:
    """Where a bench's lane time went: training, evaluation, start-up and other (seconds summed over lanes).

    Capacity is lanes × wall time. Training counts each shared training once; evaluation is every run's
    own (it includes the representation analysis, also reported alone); start-up is each lane's Ray Train
    start (fit() to its first job) plus each job's set-up (building the method and streams); other is the
    rest (dataset generation, idle lanes, records, the leaderboard).
    """
    fresh = [r for r in results if "timings" in r and not r.get("skipped")]
    per_training: dict[str, dict] = {}
    for r in fresh:
        per_training.setdefault(r["training_id"], r["timings"])
    training = sum(t["training_s"] for t in per_training.values())
    evaluation = sum(r["timings"]["evaluation_s"] for r in fresh)
    representation = sum(r["timings"].get("representation_s", 0.0) for r in fresh)
    startup = lanes["startup_s"] + sum(t["setup_s"] for t in per_training.values())
    capacity = max(1, lanes["lanes"]) * wall_s
    return {"wall_s": wall_s, "lanes": lanes["lanes"], "capacity_s": capacity, "training_s": training,
            "evaluation_s": evaluation, "representation_s": representation, "startup_s": startup,
            "other_s": max(0.0, capacity - training - evaluation - startup),
            "learning_fraction": (training + evaluation) / capacity if fresh else None}


def describe_split(split: dict) -> str:
    if split["learning_fraction"] is None:
        return "nothing trained or evaluated"
    cap = split["capacity_s"]
    parts = ", ".join(f"{name} {split[f'{name}_s'] / cap:.0%}" for name in ("training", "evaluation", "startup",
                                                                           "other"))
    return (f"time of {split['lanes']} lane(s): {parts}; representation analysis "
            f"{split['representation_s'] / cap:.0%} (part of evaluation)")


def method_overrides(suite: Suite, method: str) -> dict:
    """The hyperparameters a suite sets for `method`'s runs: its common ones, the method's own (which win), and
    the suite's epochs (which win over both). Those left to the user and not given yet are left out."""
    own = {k: v for k, v in suite.methods[method].items() if v is not None}
    return {**suite.hparams, **own, **({"epochs": suite.epochs} if suite.epochs is not None else {})}


def open_hparams(suite: Suite) -> list[str]:
    """"METHOD.KEY" of each hyperparameter the suite leaves to the user (`null`) that no flag has given."""
    return [f"{m}.{k}" for m, hp in suite.methods.items() for k, v in hp.items() if v is None]


def require_given(suite: Suite) -> None:
    """One line refusing to run a suite while a hyperparameter it leaves to the user is not given."""
    missing = open_hparams(suite)
    if missing:
        methods = {key.split(".", 1)[0] for key in missing}
        rest = [m for m in suite.methods if m not in methods]
        raise HarnessError(f"suite {suite.name!r} leaves {', '.join(missing)} to you (see the suite file): give "
                           + "--hparams " + " ".join(f"{k}=VALUE" for k in missing)
                           + (f", or run without: --methods {' '.join(rest)}" if rest else ""))


def resolved_runs(suite: Suite) -> list[tuple[str, int, dict]]:
    """(method, seed, every hyperparameter) of each run, resolved as its RunSpec will be but without a dataset
    (for --dry-run, and to refuse bad values before a preset is generated)."""
    out = []
    for method in suite.methods:
        resolved = resolve_run_hparams(method, method_overrides(suite, method))
        out += [(method, seed, resolved) for seed in suite.seeds]
    if suite.baseline not in suite.methods:
        raise HarnessError(f"baseline {suite.baseline!r} is not among the suite's methods {list(suite.methods)}")
    return out


def readme_markers(suite_name: str) -> tuple[str, str]:
    """The comments around a suite's leaderboard block in a README (`bench --readme`): one block per suite."""
    return f"<!-- {suite_name}-leaderboard:start -->", f"<!-- {suite_name}-leaderboard:end -->"


def check_readme(path: str, suite_name: str) -> None:
    """`bench --readme FILE`, checked before anything runs: the file exists and holds the suite's markers."""
    start, end = readme_markers(suite_name)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HarnessError(f"--readme {path}: cannot read it ({exc.strerror or exc})") from None
    if start not in text or end not in text:
        raise HarnessError(f"--readme {path}: no {start} ... {end} markers to replace")


def readme_block(board: dict, wall_seconds: float, command: str, splits: tuple[str, ...] = ("test",)) -> str:
    """A suite's README leaderboard block: the test-split tables (both tracks) of `board`, plus provenance."""
    import os
    import time

    from .results.plots import table_title
    from .results.report_tables import md_table, table_matrix

    lines = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
             f"wall time {wall_seconds / 60:.1f} min (dataset generation included). Accuracy (%) on the "
             f"held-out batches at each run's best validation epoch, mean ± std (n seeds); Δ and tests vs "
             f"`{board['settings']['baseline']}` on the same seeds (full tables, plots and the other splits in "
             f"the output folder's `leaderboard.md`).", ""]
    for t in board["tables"]:
        if t["split"] in splits:
            lines += [f"**{table_title(t)}**", "", *md_table(*table_matrix(t)), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path: str, suite_name: str, block: str) -> None:
    """Replace the text between `suite_name`'s leaderboard markers of `path` (checked by `check_readme`)."""
    check_readme(path, suite_name)
    start, end = readme_markers(suite_name)
    head, rest = Path(path).read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    Path(path).write_text(f"{head}{start}\n{block}{end}{tail}")
