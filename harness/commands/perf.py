"""`platebench perf data|train|tune|methods|ingest`: figures as ratios against in-run baselines."""

from __future__ import annotations


def _common(p) -> None:
    p.add_argument("--json", metavar="FILE", help="write the figures as one flat JSON object (with 'ratio')")
    p.add_argument("--address", help="Ray cluster address (default: local loopback Ray)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: cores + 1)")


def add_parser(sub):
    p = sub.add_parser("perf", help="benchmarks of the harness itself (throughput, overhead), as in-run ratios")
    perf = p.add_subparsers(dest="perf_command", metavar="BENCHMARK", required=True)
    d = perf.add_parser("data", help="stream images/s vs a plain pyarrow loop; vs the quickstart training rate")
    d.add_argument("--data", required=True, help="dataset root (e.g. the `large` preset)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--parallelism", type=int, default=2, help="read threads / concurrent read tasks")
    d.add_argument("--limit-parts", type=int, help="read only the first N parts")
    t = perf.add_parser("train", help="Ray Train step time vs plain PyTorch (1 worker); 2-worker scaling")
    t.add_argument("--method", default="erm")
    t.add_argument("--backbone", default="resnet-tiny")
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--channels", type=int, default=5)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--gpu", action="store_true")
    t.add_argument("--no-scaling", action="store_true", help="skip the 2-worker run")
    u = perf.add_parser("tune", help="per-trial Tune+Train overhead vs a trial's training time")
    u.add_argument("--data", help="dataset root (default: the `quickstart` preset, generated into a temporary folder)")
    u.add_argument("--split-scheme", default="new_batches")
    u.add_argument("--method", default="erm")
    u.add_argument("--trials", type=int, default=3)
    u.add_argument("--epochs", type=int, help="epochs per trial (default: the method's, 10: a full quickstart trial)")
    u.add_argument("--max-concurrent", type=int, default=1)
    m = perf.add_parser("methods", help="training-step time and peak memory of each method relative to ERM")
    m.add_argument("--methods", nargs="+")
    m.add_argument("--backbone", default="resnet-tiny")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--steps", type=int, default=10)
    i = perf.add_parser("ingest", help="ingestion images/s: Ray Data job vs one local process")
    i.add_argument("--src", help="raw dataset (default: generate an RxRx1-layout tree)")
    i.add_argument("--layout", default="rxrx1", choices=["rxrx1", "rxrx1-wilds", "jump-cp"])
    i.add_argument("--experiments", type=int, default=3, help="generated experiments (4 plates of 616 sites each)")
    i.add_argument("--size", type=int, default=128)
    for q in (d, t, u, m, i):
        _common(q)
    return p


def run(args) -> int:
    from platebench.harness import ray_local
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
    ray_local.init(address=args.address, num_cpus=None if args.address else (args.num_cpus or _cores() + 1))
    runners = {"data": _data, "train": _train, "tune": _tune, "ingest": _ingest}
    emit(name, runners[name](args), args.json)
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 2


def _data(args) -> dict:
    from platebench.datasets.shards import open_dataset
    from platebench.harness.perf import data

    return data.run(open_dataset(args.data), args.batch_size, args.parallelism, args.limit_parts)


def _train(args) -> dict:
    from platebench.harness.perf import train

    return train.run(args.method, args.backbone, args.image_size, args.batch_size, args.channels, args.steps,
                     gpu=args.gpu, scaling=not args.no_scaling)


def _tune(args) -> dict:
    import shutil
    import tempfile

    from platebench.harness.perf import tune
    from platebench.harness.synth_job import generate

    if args.data:
        return tune.run(args.data, args.split_scheme, args.method, args.trials, args.epochs, args.max_concurrent)
    work = tempfile.mkdtemp(prefix="pb-perf-tune-data-")
    try:
        data = f"{work}/quickstart-seed0"
        generate("quickstart", data, seed=0)
        return {**tune.run(data, args.split_scheme, args.method, args.trials, args.epochs, args.max_concurrent),
                "dataset": "quickstart preset, seed 0 (generated)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ingest(args) -> dict:
    from platebench.harness.perf import ingest

    return ingest.run(args.src, args.layout, args.experiments, args.size)
