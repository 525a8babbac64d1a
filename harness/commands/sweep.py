"""`platebench sweep`: Ray Tune (Optuna/ASHA) over a method's published search space."""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands import flags
    from platebench.harness.commands.session import add_launch_flags

    p = sub.add_parser("sweep", help="search hyperparameters with Ray Tune (Optuna TPE + ASHA); every trial is a "
                                     "Ray Train run",
                       description="Search METHOD's space (tune_spaces/METHOD.yaml or --space) on the validation "
                                   "split, write OUT/best_config.json and STORAGE/best_configs.json, and optionally "
                                   "rerun the best configuration on --final-seeds for the leaderboard.")
    flags.add_target_flags(p)
    p.add_argument("--space", metavar="FILE", help="search space YAML (default tune_spaces/METHOD.yaml)")
    flags.add_trials_flag(p, default=8)
    p.add_argument("--search", choices=["optuna", "random"], default="optuna")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    flags.add_max_concurrent_flag(p)
    flags.add_seed_flag(p)
    flags.add_model_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--final-seeds", nargs="+", type=flags.non_negative_int,
                   help="rerun the selected configuration on these seeds")
    add_launch_flags(p)
    return p


def run(args) -> int:
    import json
    from pathlib import Path

    from platebench.datasets.shards import open_dataset
    from platebench.harness.commands import session
    from platebench.harness.commands.flags import fill_defaults, parse_pairs
    from platebench.harness.train.runner import require_runs_ok, run_many
    from platebench.harness.train.runspec import build_specs, check_trainable
    from platebench.harness.train.tracking import end_parent
    from platebench.harness.tune import space as tune_space
    from platebench.harness.tune import sweep

    fill_defaults(args, "split_scheme", "backbone", "precision", "compile", "workers", "out")
    ds = open_dataset(args.data)
    fixed = parse_pairs("--hparams", args.hparams)
    if args.epochs is not None:
        fixed["epochs"] = args.epochs
    space = tune_space.for_method(args.method, ds.manifest.name, args.space)
    overlap = set(fixed) & set(space.params)
    if overlap:
        from platebench.harness.errors import HarnessError

        raise HarnessError(f"--hparams fixes {sorted(overlap)}, which the space searches; drop one of them")
    cfg = sweep.SweepConfig(data=ds.url, split_scheme=args.split_scheme, method=args.method, space=space,
                            trials=args.trials, search=args.search, scheduler=args.scheduler,
                            max_concurrent=session.max_concurrent(args), seed=args.seed, backbone=args.backbone,
                            precision=args.precision, compile=args.compile,
                            fixed_hparams=fixed)
    default_spec = sweep.trial_spec(cfg, space.defaults())  # validates method, hparams and scheme up front
    check_trainable(ds, default_spec, args.workers)
    experiment = sweep.experiment_name(cfg, ds.manifest.checksum())
    with session.storage_locked(args):  # one writing command per storage root, taken before Ray starts
        mlflow = session.open_tracking(args, experiment=f"platebench/{ds.manifest.name}", parent_name=experiment,
                                       params={"method": args.method, "search": args.search,
                                               "scheduler": args.scheduler, "trials": args.trials,
                                               "space": space.source, "seed": args.seed,
                                               "split_scheme": args.split_scheme, **fixed},
                                       reuse_parent=args.resume)
        launch = session.launch_from_args(args, mlflow)
        session.start_ray(args)
        print(f"sweep {experiment}: {args.trials} trials of {args.method}, {args.search} search, "
              f"{args.scheduler} scheduler, {cfg.max_concurrent} at once", flush=True)
        result = sweep.run_sweep(cfg, launch, resume=args.resume)
        best = sweep.select_best(cfg, launch, experiment, result["trials"])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out_file = Path(args.out) / "best_config.json"
        out_file.write_text(json.dumps({k: best[k] for k in ("method", "hparams", "metric", "value", "selection_split")}
                                       | {"selection_rule": best["selection_rule"], "trials": best["trials"],
                                          "experiment": experiment}, indent=1))
        configs_path = sweep.write_best(best, launch)
        print(f"best of {best['trials']} trials: {best['selection_split']} accuracy {best['value']:.4f} "
              f"({best['selection_rule']}) with {json.dumps({k: best['hparams'][k] for k in space.params})}")
        print(f"wrote {out_file} and {configs_path}")
        results = []
        if args.final_seeds:
            specs = build_specs(ds, args.split_scheme, args.method, best["hparams"], args.final_seeds, args.backbone,
                                precision=args.precision, compile=args.compile)
            progress = session.Progress(len(specs))
            results, _ = run_many(specs, launch, session.max_concurrent(args), progress.event)
            print(f"final seeds {args.final_seeds}: records in {launch.storage}/records; "
                  f"platebench leaderboard --records {launch.storage} --out DIR")
        if mlflow:
            end_parent(mlflow.tracking_uri, mlflow.parent_run_id, artifacts=[str(out_file)],
                       status="FAILED" if any("error" in r for r in results) else "FINISHED")
        require_runs_ok(results)
    return 0
