"""`platebench perf data|train|tune|methods|ingest|gpu`: figures as ratios against baselines measured in the same run.

Arguments are checked (and datasets opened, run specs built) before Ray starts, so a bad one is a one-line
error with exit status 2 at once.
"""

from __future__ import annotations

# What a perf flag left out means beyond the shared DEFAULTS (flags.fill_defaults): each benchmark's own amount of
# work, as the flags' help says.
_OWN_DEFAULTS = {"data": {"parallelism": 2}, "gpu": {"parallelism": 2}, "tune": {"max_concurrent": 1},
                 "ingest": {"size": 128}}


def _common(p) -> None:
    from platebench.harness.commands.flags import add_json_flag, add_ray_flags

    add_json_flag(p)
    add_ray_flags(p)


def add_parser(sub):
    from platebench.harness.commands import flags

    p = sub.add_parser("perf", help="benchmarks of the harness itself (throughput, overhead), as in-run ratios",
                       description="Each benchmark prints its figures; --json writes them as one flat object with "
                                   "'ratio'.")
    perf = p.add_subparsers(dest="perf_command", metavar="BENCHMARK", required=True)
    d = perf.add_parser("data", help="stream images/s vs the same batches read by pyarrow threads, by a torch "
                                     "DataLoader, and one core's decompression + conversion limit")
    flags.add_data_flag(d, required=True)
    flags.add_batch_size_flag(d, default=64)
    flags.add_parallelism_flag(d)
    d.add_argument("--limit-parts", type=flags.positive_int, help="read only the plates of the first N parts")
    flags.add_repeats_flag(d, default=2)
    t = perf.add_parser("train", help="one `platebench run` epoch (Ray Train + Ray Data) vs a plain PyTorch loop "
                                      "over the same shards, training and evaluation alike")
    flags.add_target_flags(t, required=False)
    flags.add_hparams_flag(t)
    flags.add_backbone_flag(t)
    flags.add_run_settings_flags(t)
    flags.add_seed_flag(t)
    flags.add_workers_flag(t)
    flags.add_cpus_per_worker_flag(t)
    t.add_argument("--read-threads", type=flags.positive_int, default=4, help="pyarrow read threads of the plain loop")
    flags.add_cache_mb_flag(t)
    flags.add_gpu_flag(t)
    flags.add_repeats_flag(t, default=1)
    u = perf.add_parser("tune", help="per-trial Tune+Train overhead vs a trial's training time")
    flags.add_target_flags(u, required=False)
    flags.add_trials_flag(u, default=3)
    flags.add_epochs_flag(u)  # the method's default, 10: a full quickstart trial
    flags.add_max_concurrent_flag(u)
    m = perf.add_parser("methods", help="training-step time and peak memory of each method relative to ERM")
    flags.add_methods_flag(m)
    flags.add_backbone_flag(m)
    flags.add_batch_size_flag(m, default=32)
    m.add_argument("--image-size", type=flags.positive_int, default=32)
    m.add_argument("--steps", type=flags.positive_int, default=10)
    i = perf.add_parser("ingest", help="ingestion images/s: the Ray Data job (first, then warm) vs a process pool "
                                       "of as many workers")
    flags.add_src_flag(i)
    i.add_argument("--layout", default="rxrx1", choices=["rxrx1", "rxrx1-wilds", "jump-cp"])
    i.add_argument("--experiments", type=flags.positive_int, default=3,
                   help="generated experiments (4 plates of 616 sites each)")
    flags.add_size_flag(i)
    flags.add_parallelism_flag(i)
    g = perf.add_parser("gpu", help="the GPU check: every method's kit steps on CUDA, a quickstart epoch and "
                                    "rxrx1-scale ResNet-50 at 512 px in fp32 and bf16-mixed, cores per GPU")
    flags.add_parallelism_flag(g)
    for q in (d, t, u, m, i, g):
        _common(q)
    return p


def run(args) -> int:
    from platebench.harness.perf.common import emit

    name = args.perf_command
    _fill_defaults(args)
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

    runners = {"data": _data, "train": _train, "tune": _tune, "ingest": _ingest, "gpu": _gpu}
    keys = importlib.import_module(f"platebench.harness.perf.{name}").KEYS  # the documented figures
    emit(name, runners[name](args), args.json, keys)
    return 0


def _fill_defaults(args) -> None:
    from platebench.harness.commands.flags import fill_defaults

    fill_defaults(args, *(d for d in ("split_scheme", "method", "backbone", "workers", "precision", "compile")
                          if hasattr(args, d)))
    for dest, value in _OWN_DEFAULTS.get(args.perf_command, {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def _local_cpus(args) -> int | None:
    """Logical CPUs of the local Ray the benchmarks start (None: joining --address)."""
    import os

    return None if args.address else args.num_cpus or (os.cpu_count() or 2) + 1


def _start_ray(args) -> None:
    from platebench.harness import ray_local

    ray_local.init(address=args.address, num_cpus=_local_cpus(args))


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
        spec = train.prepare(args.data, args.split_scheme, args.method, hparams, args.backbone, args.seed, args.workers,
                             precision=args.precision, compile=args.compile)
        _start_ray(args)
        return train.run(spec, **options)
    from platebench.harness.train.runspec import resolve_run_hparams

    resolve_run_hparams(args.method, {**hparams, "epochs": 1})  # before a minute of generation
    work = tempfile.mkdtemp(prefix="pb-perf-train-")
    try:
        _start_ray(args)
        data = _quickstart(f"{work}/quickstart-seed0")
        spec = train.prepare(data, args.split_scheme, args.method, hparams, args.backbone, args.seed, args.workers,
                             precision=args.precision, compile=args.compile)
        _start_ray(args)
        return {**train.run(spec, storage=f"{work}/storage", **options),
                "dataset": "quickstart preset, seed 0 (generated)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gpu(args) -> dict:
    import shutil
    import tempfile

    from platebench.harness.perf import gpu

    gpu.require_cuda()  # one line, exit 2, before Ray starts
    work = tempfile.mkdtemp(prefix="pb-perf-gpu-")
    try:
        _start_ray(args)
        return gpu.run(work, args.parallelism)
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
    # Ray is started by the first Ray job, inside its clock: its cold figure counts Ray's start-up.
    return ingest.run(args.src, args.layout, args.experiments, args.size, args.parallelism, address=args.address,
                      num_cpus=_local_cpus(args))
