"""`platebench run`: train one method for one or more seeds with Ray Train."""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands import flags
    from platebench.harness.commands.session import add_launch_flags

    p = sub.add_parser("run", help="train one method for some seeds (Ray Train, DDP), evaluate every epoch",
                       description="Train METHOD on the dataset's split scheme for each seed, in Ray Train lanes. Runs "
                                   "are content-addressed: the same command resumes an interrupted run and skips "
                                   "finished ones.")
    flags.add_target_flags(p)
    flags.add_seeds_flag(p)
    flags.add_model_flags(p)
    flags.add_max_concurrent_flag(p)
    add_launch_flags(p)
    return p


def run(args) -> int:
    from platebench.datasets.shards import open_dataset
    from platebench.harness.commands import session
    from platebench.harness.commands.flags import fill_defaults, parse_pairs
    from platebench.harness.train.runner import require_runs_ok, run_many
    from platebench.harness.train.runspec import build_specs, check_trainable

    fill_defaults(args, "split_scheme", "seeds", "backbone", "precision", "compile", "workers", "out")
    hparams = parse_pairs("--hparams", args.hparams)
    if args.epochs is not None:
        hparams["epochs"] = args.epochs
    ds = open_dataset(args.data)
    specs = build_specs(ds, args.split_scheme, args.method, hparams, args.seeds, args.backbone,
                        precision=args.precision, compile=args.compile)
    check_trainable(ds, specs[0], args.workers)
    with session.storage_locked(args):  # one writing command per storage root, taken before Ray starts
        mlflow = session.open_tracking(args, experiment=f"platebench/{ds.manifest.name}",
                                       parent_name=f"run {args.method} on {ds.manifest.name}/{args.split_scheme}",
                                       params={"method": args.method, "seeds": args.seeds, "data": args.data,
                                               "split_scheme": args.split_scheme, **specs[0].hparams})
        launch = session.launch_from_args(args, mlflow)
        session.start_ray(args)
        progress = session.Progress(len(specs))
        results, _ = run_many(specs, launch, session.max_concurrent(args), progress.event)
        if mlflow:
            from platebench.harness.train.tracking import end_parent

            end_parent(mlflow.tracking_uri, mlflow.parent_run_id,
                       status="FAILED" if any("error" in r for r in results) else "FINISHED")
        for r in results:
            if "error" not in r:
                val = r.get("final_metrics", {}).get("val_accuracy", float("nan"))
                note = " (already done)" if r.get("skipped") else ""
                print(f"{r['method']} seed {r['seed']}: run {r['run_id']} last val_accuracy {val:.4f}{note}")
                if r.get("mlflow_gaps"):
                    print(f"  warning: MLflow logging failed {len(r['mlflow_gaps'])} time(s) (records in storage are "
                          f"complete): {'; '.join(r['mlflow_gaps'][:3])}")
        print(f"records: {launch.storage}/records  (platebench leaderboard --records {launch.storage} ...)")
        require_runs_ok(results)
    return 0
