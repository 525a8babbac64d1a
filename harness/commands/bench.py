"""`platebench bench`: the default benchmark (or a suite file) end to end, resumable."""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands import flags
    from platebench.harness.commands.session import add_launch_flags

    p = sub.add_parser("bench", help="run a benchmark suite (default: 8 methods x 5 seeds on quickstart) and "
                                     "write its leaderboard",
                       description="Generate the dataset if absent, train every (method, seed) of the suite as "
                                   "concurrent Ray Train runs, then write the leaderboard. Interrupt and re-run to "
                                   "finish only what is missing. Flags given override the suite; flags left out "
                                   "take the suite's values.")
    p.add_argument("--suite", metavar="NAME", help="a built-in suite by name (default: quickstart; see --list-suites)")
    p.add_argument("--config", metavar="FILE", help="a suite YAML file of your own")
    p.add_argument("--list-suites", action="store_true", help="list the built-in suites and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print every resolved run (method, seed, every hyperparameter) and exit without training")
    flags.add_preset_flag(p)
    flags.add_data_flag(p)
    flags.add_split_scheme_flag(p)
    flags.add_methods_flag(p)
    flags.add_seeds_flag(p)
    flags.add_model_flags(p)
    flags.add_baseline_flag(p)
    flags.add_max_concurrent_flag(p)
    p.add_argument("--readme", metavar="FILE", help="also rewrite FILE's block between <!-- SUITE-leaderboard:start "
                                                   "--> and <!-- SUITE-leaderboard:end --> with the test-split "
                                                   "tables (how README.md's figures are produced)")
    add_launch_flags(p)
    return p


def _apply_flags(suite, args) -> None:
    if args.preset:
        suite.dataset = {"preset": args.preset, "seed": suite.dataset.get("seed", 0)}
    if args.data:
        suite.dataset = {"url": args.data}  # a suite's `expects` stays: the dataset is checked against it
    if args.methods:
        suite.methods = {m: suite.methods.get(m, {}) for m in args.methods}
        if suite.baseline not in suite.methods:
            suite.baseline = args.methods[0]
    if args.hparams:
        from platebench.harness.commands.flags import parse_pairs
        from platebench.harness.errors import HarnessError

        pairs = parse_pairs("--hparams", args.hparams)
        common = {k: v for k, v in pairs.items() if "." not in k}
        suite.methods = {m: {**hp, **common} for m, hp in suite.methods.items()}
        for key, value in pairs.items():  # METHOD.KEY=VALUE: that method's only
            if "." in key:
                method, name = key.split(".", 1)
                if method not in suite.methods:
                    raise HarnessError(f"--hparams {key}: {method!r} is not among the suite's methods "
                                       f"({', '.join(suite.methods)})")
                suite.methods[method][name] = value
    for key in ("split_scheme", "seeds", "epochs", "backbone", "baseline", "workers", "precision", "compile"):
        value = getattr(args, key)
        if value is not None:
            setattr(suite, key, value)


def run(args) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from platebench.datasets.shards import open_dataset
    from platebench.harness import suite as bench
    from platebench.harness.commands import session
    from platebench.harness.commands.flags import fill_defaults
    from platebench.harness.errors import HarnessError
    from platebench.harness.results.completeness import describe, read_complete
    from platebench.harness.results.leaderboard import build_leaderboard
    from platebench.harness.results.report import to_markdown, write_report
    from platebench.harness.train.runner import require_runs_ok, run_many
    from platebench.harness.train.tracking import end_parent

    t0 = time.time()
    fill_defaults(args, "out")  # only: every other flag left out takes the suite's value
    if args.list_suites:
        for name, path in bench.builtin_suites().items():
            s = bench.Suite.load(path)
            data = s.dataset.get("preset") or s.expects or s.dataset.get("url")
            own = "".join(f" ({m}: {b})" for m, b in s.backbones.items())
            print(f"{name:18s} {len(s.methods)} methods x {len(s.seeds)} seeds on {data} ({s.split_scheme}), "
                  f"{s.backbone}{own}: {', '.join(s.methods)}")
        return 0
    if args.suite and args.config:
        raise HarnessError("give a built-in --suite NAME or a --config FILE, not both")
    suite = bench.Suite.load(args.config) if args.config else bench.named_suite(args.suite or "quickstart")
    _apply_flags(suite, args)
    if args.dry_run:
        for method, seed, hp in bench.resolved_runs(suite):
            left = {k: "(yours)" for k, v in suite.methods[method].items() if v is None}
            print(f"{method} seed={seed} backbone={suite.backbone_of(method)} "
                  + " ".join(f"{k}={v}" for k, v in sorted({**hp, **left}.items())))
        try:
            bench.require_given(suite)
        except HarnessError as exc:
            print(f"note: {exc}", file=sys.stderr)
        return 0
    args.workers = suite.workers
    out = Path(args.out)
    # Everything that can be checked is checked before Ray starts: methods, hyperparameters, baseline, and the
    # dataset when it exists already (a preset is generated on Ray, then checked).
    bench.require_given(suite)
    bench.resolved_runs(suite)
    if args.readme:
        bench.check_readme(args.readme, suite.name)
    url = bench.dataset_url(suite, out)
    specs = bench.build_all_specs(suite, open_dataset(url)) if "url" in suite.dataset else None
    with session.storage_locked(args):  # one writing command per storage root, taken before Ray starts
        out.mkdir(parents=True, exist_ok=True)  # after every check: a refused command leaves no folder behind
        session.start_ray(args)
        url = bench.ensure_dataset(suite, out)
        ds = open_dataset(url)
        specs = specs or bench.build_all_specs(suite, ds)
        mlflow = session.open_tracking(args, experiment=f"platebench/{ds.manifest.name}",
                                       parent_name=f"bench {suite.name}",
                                       params={"suite": suite.name, "data": url, "split_scheme": suite.split_scheme,
                                               "methods": ",".join(suite.methods), "seeds": suite.seeds,
                                               "epochs": suite.epochs, "backbone": suite.backbone})
        launch = session.launch_from_args(args, mlflow)
        print(f"bench {suite.name}: {len(suite.methods)} methods x {len(suite.seeds)} seeds = {len(specs)} runs on "
              f"{url} ({suite.split_scheme}); {session.max_concurrent(args)} at once", flush=True)
        progress = session.Progress(len(specs))
        results, lanes = run_many(specs, launch, session.max_concurrent(args), progress.event)
        # Complete runs only: a failed or interrupted run is left out and named, never ranked.
        complete = read_complete(launch.storage, launch.options, run_ids=[s.run_id for s in specs])
        for skipped in complete.skipped:
            print(f"bench {suite.name}: {describe(skipped)}", file=sys.stderr, flush=True)
        files: list[str] = []
        if len(complete.records):
            board = build_leaderboard(complete.records, baseline=suite.baseline, rule=suite.selection,
                                      done=complete.done, skipped=complete.skipped)
            files = write_report(board, str(out))
            print(to_markdown(board))
            if args.readme:
                import shlex

                argv = args.argv
                kept = [a for i, a in enumerate(argv) if a != "--readme" and not (i and argv[i - 1] == "--readme")]
                command = "platebench " + " ".join(shlex.quote(a) for a in kept)
                bench.update_readme(args.readme, suite.name, bench.readme_block(board, time.time() - t0, command))
        if mlflow:
            end_parent(mlflow.tracking_uri, mlflow.parent_run_id,
                       status="FAILED" if any("error" in r for r in results) else "FINISHED",
                       artifacts=[f for f in files if f.endswith((".md", ".json", ".html", ".png", ".csv"))])
        split = bench.time_split(results, lanes, time.time() - t0)
        (out / "bench-time.json").write_text(json.dumps(split, indent=1))
        trained = len({r["training_id"] for r in results if "training_id" in r and not r.get("skipped")})
        print(f"bench {suite.name}: {sum('error' not in r for r in results)}/{len(specs)} runs complete "
              f"({trained} trainings run now) in {split['wall_s'] / 60:.1f} min; {bench.describe_split(split)}; "
              f"leaderboard in {out}/leaderboard.md", flush=True)
        require_runs_ok(results)
    return 0
