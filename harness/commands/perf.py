"""`platebench perf data|train|tune|methods|ingest`: figures as ratios against baselines measured in the same run.

Arguments are checked (and datasets opened, run specs built) before Ray starts, so a bad one is a one-line
error with exit status 2 at once.
"""

from __future__ import annotations


def _common(p) -> None:
    from platebench.harness.commands.flags import add_json_flag, add_ray_flags

    add_json_flag(p, "the figures (one flat object with 'ratio')")
    add_ray_flags(p)


def add_parser(sub):
    from platebench.harness.commands.flags import add_seed_flag, non_negative_int, positive_float, positive_int
    from platebench.harness.train.runner import Launch

    p = sub.add_parser("perf", help="benchmarks of the harness itself (throughput, overhead), as in-run ratios")
    perf = p.add_subparsers(dest="perf_command", metavar="BENCHMARK", required=True)
    d = perf.add_parser("data", help="stream images/s vs the same batches read by pyarrow threads, by a torch "
                                     "DataLoader, and one core's decompression + conversion limit")
    d.add_argument("--data", required=True, help="dataset root (e.g. the `large` preset)")
    d.add_argument("--batch-size", type=positive_int, default=64)
    d.add_argument("--parallelism", type=positive_int, default=2,
                   help="concurrent read tasks / read threads / DataLoader workers")
    d.add_argument("--limit-parts", type=positive_int, help="read only the plates of the first N parts")
    d.add_argument("--repeats", type=positive_int, default=2, help="interleaved repeats; the best of each path is kept")
    t = perf.add_parser("train", help="one `platebench run` epoch (Ray Train + Ray Data) vs a plain PyTorch loop "
                                      "over the same shards, training and evaluation alike")
    t.add_argument("--data", help="dataset root (default: the `quickstart` preset, generated into a temporary folder)")
    t.add_argument("--split-scheme", default="new_batches")
    t.add_argument("--method", default="erm")
    t.add_argument("--hparams", nargs="*", default=[], metavar="KEY=VALUE", help="hyperparameter overrides")
    t.add_argument("--backbone", default="resnet-tiny")
    add_seed_flag(t, "the run's training")
    t.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers / plain DDP processes")
    t.add_argument("--cpus-per-worker", type=positive_float, default=1.0,
                   help="torch threads of each worker, both paths")
    t.add_argument("--read-threads", type=positive_int, default=4, help="pyarrow read threads of the plain loop")
    t.add_argument("--cache-mb", type=non_negative_int, default=Launch.cache_mb,
                   help="per worker, both paths: parts kept in memory")
    t.add_argument("--gpu", action="store_true")
    t.add_argument("--repeats", type=positive_int, default=1,
                   help="interleaved repeats; the best wall time of each is kept")
    u = perf.add_parser("tune", help="per-trial Tune+Train overhead vs a trial's training time")
    u.add_argument("--data", help="dataset root (default: the `quickstart` preset, generated into a temporary folder)")
    u.add_argument("--split-scheme", default="new_batches")
    u.add_argument("--method", default="erm")
    u.add_argument("--trials", type=positive_int, default=3)
    u.add_argument("--epochs", type=positive_int,
                   help="epochs per trial (default: the method's, 10: a full quickstart trial)")
    u.add_argument("--max-concurrent", type=positive_int, default=1)
    m = perf.add_parser("methods", help="training-step time and peak memory of each method relative to ERM")
    m.add_argument("--methods", nargs="+")
    m.add_argument("--backbone", default="resnet-tiny")
    m.add_argument("--batch-size", type=positive_int, default=32)
    m.add_argument("--image-size", type=positive_int, default=32)
    m.add_argument("--steps", type=positive_int, default=10)
    i = perf.add_parser("ingest", help="ingestion images/s: the Ray Data job (first, then warm) vs a process pool "
                                       "of as many workers")
    i.add_argument("--src", help="raw dataset (default: generate an RxRx1-layout tree)")
    i.add_argument("--layout", default="rxrx1", choices=["rxrx1", "rxrx1-wilds", "jump-cp"])
    i.add_argument("--experiments", type=positive_int, default=3,
                   help="generated experiments (4 plates of 616 sites each)")
    i.add_argument("--size", type=positive_int, default=128)
    i.add_argument("--parallelism", type=positive_int, help="Ray tasks and pool processes (default: the Ray CPUs)")
    for q in (d, t, u, m, i):
        _common(q)
    return p


def run(args) -> int:
    from platebench.harness.perf.common import emit

    name = args.perf_command
    if name == "methods":
        from platebench.harness.perf import methods

        figures, rows = methods.run(args.methods, args.backbone, args.batch_size, args.image_size, args.steps)
        print(f"{'method':<14}{'step s':>10}{'x erm':>8}{'img/step':>10}{'per img x erm':>15}{'mem x erm':>11}")
        for r in rows:
            mem = f"{r['mem_vs_erm']:.2f}" if r["mem_vs_erm"] is not None else "n/a"
            print(f"{r['method']:<14}{r['step_seconds']:>10.4f}{r['time_vs_erm']:>8.2f}{r['images_per_step']:>10}"
                  f"{r['per_image_vs_erm']:>15.2f}{mem:>11}")
        emit("methods", figures, args.json)
        return 0
    import importlib

    runners = {"data": _data, "train": _train, "tune": _tune, "ingest": _ingest}
    keys = importlib.import_module(f"platebench.harness.perf.{name}").KEYS  # the documented figures
    emit(name, runners[name](args), args.json, keys)
    return 0


def _start_ray(args) -> None:
    import os

    from platebench.harness import ray_local

    local_cpus = args.num_cpus or (os.cpu_count() or 2) + 1
    ray_local.init(address=args.address, num_cpus=None if args.address else local_cpus)


def _data(args) -> dict:
    from platebench.datasets.shards import open_dataset
    from platebench.harness.perf import data

    ds = open_dataset(args.data)
    _start_ray(args)
    return data.run(ds, args.batch_size, args.parallelism, args.limit_parts, args.repeats)


def _train(args) -> dict:
    import shutil
    import tempfile

    from platebench.harness.commands.flags import parse_pairs
    from platebench.harness.perf import train

    if args.cpus_per_worker < 1:
        from platebench.harness.errors import HarnessError

        raise HarnessError(f"--cpus-per-worker must be at least 1 (torch threads), got {args.cpus_per_worker}")
    hparams = parse_pairs("--hparams", args.hparams)
    options = {"workers": args.workers, "gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker,
               "read_threads": args.read_threads, "cache_mb": args.cache_mb, "repeats": args.repeats}
    if args.data:
        spec = train.prepare(args.data, args.split_scheme, args.method, hparams, args.backbone, args.seed, args.workers)
        _start_ray(args)
        return train.run(spec, **options)
    from platebench.methods import get_method
    from platebench.methods.base import resolve_hparams

    resolve_hparams(get_method(args.method), {**hparams, "epochs": 1})  # before a minute of generation
    work = tempfile.mkdtemp(prefix="pb-perf-train-")
    try:
        _start_ray(args)
        data = _quickstart(f"{work}/quickstart-seed0")
        spec = train.prepare(data, args.split_scheme, args.method, hparams, args.backbone, args.seed, args.workers)
        _start_ray(args)
        return {**train.run(spec, storage=f"{work}/storage", **options),
                "dataset": "quickstart preset, seed 0 (generated)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quickstart(out: str) -> str:
    from platebench.harness.prepare.synth import generate

    generate("quickstart", out, seed=0)
    return out


def _tune(args) -> dict:
    import shutil
    import tempfile

    from platebench.harness.perf import tune

    if args.data:
        from platebench.datasets.shards import open_dataset

        open_dataset(args.data)
        _start_ray(args)
        return tune.run(args.data, args.split_scheme, args.method, args.trials, args.epochs, args.max_concurrent)
    work = tempfile.mkdtemp(prefix="pb-perf-tune-data-")
    try:
        _start_ray(args)
        data = _quickstart(f"{work}/quickstart-seed0")
        return {**tune.run(data, args.split_scheme, args.method, args.trials, args.epochs, args.max_concurrent),
                "dataset": "quickstart preset, seed 0 (generated)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ingest(args) -> dict:
    from platebench.harness.perf import ingest

    if not args.src and args.experiments < 3:  # 2 train experiments (one held out for validation) + test
        from platebench.harness.errors import HarnessError

        raise HarnessError(f"--experiments must be at least 3, got {args.experiments}")
    _start_ray(args)
    return ingest.run(args.src, args.layout, args.experiments, args.size, args.parallelism)
