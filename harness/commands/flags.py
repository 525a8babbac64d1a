"""The command line's shared flags and argument types.

Every flag that more than one command (or `perf` benchmark) takes is declared here, once, by one `add_*`
function: one help text, type, metavar and default rule wherever it appears (tests/test_cli.py walks the parser
to hold that). The only per-command choice is `required=` (and `several=` for --records).

Default rule: a shared flag left out is None (--hparams: an empty list) in every command, and the command takes
the default its help names (DEFAULTS, through `fill_defaults`); `bench` takes its suite's value instead, so that
only the flags given override the suite. The exceptions are the amounts of work in PER_COMMAND_DEFAULT, whose
default is the command's own and shown by the help.

A bad value is one argparse error line naming the flag (exit 2), before anything starts.
"""

from __future__ import annotations

import argparse

from platebench.datasets.synth import PRESETS
from platebench.methods.backbones import DEFAULT_BACKBONE
from platebench.methods.precision import DEFAULT_PRECISION, PRECISIONS

# What a shared flag left out means, for every command that fills it (bench: the suite's value instead).
DEFAULTS = {
    "split_scheme": "new_batches",  # the synthetic presets' scheme (they also define new_lab)
    "backbone": DEFAULT_BACKBONE,
    "precision": DEFAULT_PRECISION,
    "compile": False,
    "seeds": [0],
    "workers": 1,
    "out": "platebench-out",
    "method": "erm",  # perf train / tune; run and sweep require --method
    "baseline": "erm",
    "preset": "quickstart",
}

# Amounts of work whose default belongs to each command (a sweep's trials are not a benchmark's): the one help
# text shows it with %(default)s.
PER_COMMAND_DEFAULT = frozenset({"--trials", "--batch-size", "--repeats"})


def fill_defaults(args: argparse.Namespace, *dests: str) -> None:
    """Give each flag of `dests` that was left out (None) its DEFAULTS value."""
    for dest in dests:
        if getattr(args, dest) is None:
            value = DEFAULTS[dest]
            setattr(args, dest, list(value) if isinstance(value, list) else value)


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _float_above(minimum: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"must be > {minimum:g}, got {value:g}")
        return value

    parse.__name__ = f"number > {minimum:g}"
    return parse


positive_int = _int_at_least(1)  # --workers, --epochs, --trials, --num-cpus, --max-concurrent
non_negative_int = _int_at_least(0)  # --seeds, --max-failures, --cache-mb
positive_float = _float_above(0.0)  # --cpus-per-worker


def parse_pairs(flag: str, pairs: list[str] | None) -> dict[str, str]:
    """KEY=VALUE strings of a flag (`--hparams`, `--set`): values stay strings, their owner coerces and checks
    them. A pair without '=' or a key is one error line naming the flag."""
    from ..errors import HarnessError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def write_json(payload, dest: str) -> None:
    """The destination of --json: "-" is stdout."""
    import json
    from pathlib import Path

    text = json.dumps(payload, indent=1, default=str)
    if dest == "-":
        print(text)
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text(text + "\n")


# ---------------------------------------------------------------------------------------------
# where things are: data, outputs, records
# ---------------------------------------------------------------------------------------------
def add_data_flag(p, required: bool = False) -> None:
    """`--data URL`: always a dataset root; synth and ingest write it, every other command reads it."""
    p.add_argument("--data", required=required, metavar="URL",
                   help="dataset root: a folder, file:// or s3:// URL (synth and ingest write it; bench: replaces "
                        "the suite's dataset; analyze: where the run's dataset moved to; validate --reproduce: the "
                        "runs' dataset; perf train/tune: default a quickstart preset generated into a temporary "
                        "folder)")


def add_out_flag(p, required: bool = False) -> None:
    """`--out DIR`: always the folder the command writes its products into (never a dataset: that is --data)."""
    p.add_argument("--out", required=required, metavar="DIR",
                   help=f"folder the command writes its products into (run, bench, sweep: default "
                        f"{DEFAULTS['out']}, also the MLflow store and the default --storage; analyze: default "
                        f"analysis/RUN_ID)")


def add_records_flag(p, required: bool = True, several: bool = False) -> None:
    """`--records STORAGE`: the storage root of finished runs; `several`: merged by run id (leaderboard)."""
    p.add_argument("--records", required=required, nargs="+" if several else None, metavar="STORAGE",
                   help="storage root of the runs, holding records/ and runs/: a folder, file:// or s3:// URL "
                        "(leaderboard: several, merged by run id, each also a records/ folder or a result bundle)")


def add_src_flag(p, required: bool = False) -> None:
    """`--src URL`: a raw (not yet ingested) dataset."""
    p.add_argument("--src", required=required, metavar="URL",
                   help="raw dataset location: a folder, file:// or s3:// URL (ingest jump-cp: default the public "
                        "Cell Painting Gallery's cpg0016-jump; perf ingest: default a generated RxRx1-layout tree)")


def add_run_flag(p) -> None:
    """`--run RUN_ID`: one finished run of --records."""
    p.add_argument("--run", required=True, metavar="RUN_ID",
                   help="run id, or a prefix naming one finished run (e.g. erm-s0); runs/<RUN_ID>/done.json must exist")


def add_epoch_flag(p) -> None:
    """`--epoch N`: which epoch's weights of a finished run."""
    p.add_argument("--epoch", type=positive_int, help="the epoch whose weights are used (default: the run's "
                                                      "selected epoch, else its last)")


def add_json_flag(p) -> None:
    """`--json [FILE]`: the command's result as JSON, to FILE or stdout."""
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the command's result as JSON to FILE (stdout when FILE is omitted)")


# ---------------------------------------------------------------------------------------------
# what is trained
# ---------------------------------------------------------------------------------------------
def add_split_scheme_flag(p) -> None:
    """`--split-scheme NAME`: one of the dataset's split schemes."""
    p.add_argument("--split-scheme", metavar="NAME",
                   help=f"split scheme of the dataset (default {DEFAULTS['split_scheme']}, the synthetic presets'; "
                        f"bench: the suite's; inspect: counts for every scheme)")


def add_preset_flag(p) -> None:
    """`--preset NAME`: a synthetic dataset preset."""
    p.add_argument("--preset", metavar="NAME",
                   help=f"synthetic dataset preset: {', '.join(PRESETS)} (default {DEFAULTS['preset']}; bench: "
                        f"replaces the suite's dataset)")


def add_method_flag(p, required: bool = False) -> None:
    """`--method NAME`: one registered method."""
    p.add_argument("--method", required=required, metavar="NAME",
                   help=f"a method, as `platebench methods` lists them (perf train/tune: default "
                        f"{DEFAULTS['method']})")


def add_methods_flag(p) -> None:
    """`--methods NAME ...`: a set of methods."""
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="only these methods (default: every one; bench: instead of the suite's; export: their runs)")


def add_baseline_flag(p) -> None:
    """`--baseline NAME`: the method every other is compared with."""
    p.add_argument("--baseline", metavar="NAME",
                   help=f"method every other is compared with (default {DEFAULTS['baseline']}; bench: the suite's)")


def add_backbone_flag(p) -> None:
    """`--backbone NAME`: the network every method trains."""
    p.add_argument("--backbone", metavar="NAME",
                   help=f"network: {DEFAULTS['backbone']} (default; bench: the suite's) | resnet18 | resnet50 | "
                        f"densenet161 | timm:NAME | ...")


def add_hparams_flag(p) -> None:
    """`--hparams KEY=VALUE ...`: hyperparameters (their owner coerces and checks them: parse_pairs)."""
    p.add_argument("--hparams", nargs="*", default=[], metavar="KEY=VALUE",
                   help="hyperparameters of every method trained, over its defaults and a suite's values (sweep: "
                        "fixed, not searched; bench: METHOD.KEY=VALUE sets one method's)")


def add_epochs_flag(p) -> None:
    """`--epochs N`: shorthand for --hparams epochs=N."""
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help="epochs of every training, i.e. --hparams epochs=N (default: the method's; bench: the "
                        "suite's)")


def add_seed_flag(p) -> None:
    """`--seed N`: the one seed of what the command draws; commands that train several seeds take `--seeds`."""
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of everything the command draws at random: synth's generator, sweep's searcher and "
                        "trials, perf train's run, validate --reproduce's choice of runs (default 0); the same seed, "
                        "the same result")


def add_seeds_flag(p) -> None:
    """`--seeds N ...`: the training seeds, one run per seed and method."""
    p.add_argument("--seeds", nargs="+", type=non_negative_int, metavar="N",
                   help=f"training seeds, one run per seed and method (default {' '.join(map(str, DEFAULTS['seeds']))}"
                        f"; bench: the suite's)")


def add_trials_flag(p, default: int) -> None:
    """`--trials N`: configurations tried (PER_COMMAND_DEFAULT)."""
    p.add_argument("--trials", type=positive_int, default=default, metavar="N",
                   help="configurations tried, each one training (default %(default)s)")


# ---------------------------------------------------------------------------------------------
# how it runs
# ---------------------------------------------------------------------------------------------
def add_target_flags(p, required: bool = True) -> None:
    """--data, --split-scheme, --method: what a training command trains (run, sweep, perf train/tune)."""
    add_data_flag(p, required=required)
    add_split_scheme_flag(p)
    add_method_flag(p, required=required)


def add_run_settings_flags(p) -> None:
    """--precision, --compile: how a training computes (run, sweep, bench, perf train); part of the run id."""
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"numeric precision of training and evaluation: {DEFAULTS['precision']} (default; bench: the "
                        f"suite's) | bf16-mixed | fp16-mixed (autocast; fp16 with loss scaling); part of the run id")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the network's backbone (default off; bench: the suite's); part of the run id")


def add_model_flags(p) -> None:
    """--hparams, --epochs, --backbone, --precision, --compile: how the trained model is set up and computed (run,
    sweep, bench)."""
    add_hparams_flag(p)
    add_epochs_flag(p)
    add_backbone_flag(p)
    add_run_settings_flags(p)


def add_ray_flags(p) -> None:
    """--address / --num-cpus: joining a cluster or sizing the local Ray, the same in every command."""
    p.add_argument("--address", help="Ray cluster address (e.g. auto on the head node); default: start a local "
                                     "loopback-only Ray")
    p.add_argument("--num-cpus", type=positive_int, help="logical CPUs of a local Ray (default: cores + 1)")


def add_max_concurrent_flag(p) -> None:
    """`--max-concurrent K`: trainings at once."""
    p.add_argument("--max-concurrent", type=positive_int, metavar="K",
                   help="runs (sweep, perf tune: trials) trained at once (default: cores / workers on a local Ray, "
                        "64 on a cluster; perf tune: 1)")


def add_workers_flag(p) -> None:
    """`--workers N`: Ray Train workers of one run."""
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help=f"Ray Train workers per run, DDP (default {DEFAULTS['workers']}; bench: the suite's; perf "
                        f"train: also the plain loop's processes)")


def add_cpus_per_worker_flag(p) -> None:
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, metavar="N",
                   help="CPUs reserved for each training worker (default 1; perf train: also each path's torch "
                        "threads)")


def add_cache_mb_flag(p) -> None:
    from ..train.runner import Launch

    p.add_argument("--cache-mb", type=non_negative_int, default=Launch.cache_mb, metavar="MB",
                   help="per worker: keep dataset parts in memory across epochs up to this size (0: off; default "
                        "%(default)s)")


def add_gpu_flag(p) -> None:
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL backend")


def add_mlflow_flags(p) -> None:
    """--mlflow-uri / --no-mlflow, one or the other."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mlflow-uri", metavar="URI",
                   help="MLflow tracking URI (default: run, bench, sweep: sqlite:///OUT/mlflow.db; analyze: "
                        "$MLFLOW_TRACKING_URI, else STORAGE/mlflow.db when it exists)")
    g.add_argument("--no-mlflow", action="store_true",
                   help="no MLflow: records and files are written all the same")


def add_parallelism_flag(p) -> None:
    """`--parallelism N`: tasks at once of a data job."""
    p.add_argument("--parallelism", type=positive_int, metavar="N",
                   help="tasks at once: ingest's plates in flight (bounds memory), perf's readers or processes per "
                        "path (default: the Ray CPUs; perf data: 2)")


def add_size_flag(p) -> None:
    """`--size N`: side of the images written."""
    p.add_argument("--size", type=positive_int, metavar="N",
                   help="side in pixels of the images written (synth: default the preset's; ingest jump-cp: "
                        "centre-crop after downscaling, as --crop; perf ingest: the generated raw images', default "
                        "128)")


def add_batch_size_flag(p, default: int) -> None:
    """`--batch-size N` of a benchmark (PER_COMMAND_DEFAULT)."""
    p.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                   help="images per batch (default %(default)s)")


def add_repeats_flag(p, default: int) -> None:
    """`--repeats N` of a benchmark (PER_COMMAND_DEFAULT)."""
    p.add_argument("--repeats", type=positive_int, default=default, metavar="N",
                   help="interleaved repeats; the best of each path is kept (default %(default)s)")
