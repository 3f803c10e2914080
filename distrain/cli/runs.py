"""`distrain runs [--storage PATH]` lists the runs and sweeps there; `distrain runs show NAME` shows one.

    distrain runs                                  # outputs/ (the configs' default scaling.storage_path)
    distrain runs --storage s3://bucket/runs
    distrain runs show fashion_mnist_cpu           # summary and paths; a sweep's trials too
Ends with one JSON line.
"""

from distrain.cli import CommandError, emit_json


def add_arguments(parser):
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    parser.add_argument("name", nargs="?", help="with show: the run or sweep name (train.name / tune.name)")
    parser.add_argument("--storage", default="outputs", help="the storage folder (default: outputs)")


def run(args) -> int:
    from distrain.inference.runs import list_runs, show, table

    try:
        if args.action == "show":
            if not args.name:
                raise CommandError("runs show needs a NAME (distrain runs lists them)")
            row = show(args.storage, args.name)
            print(table([row]))
            for key, value in row["summary"].items():
                if key in ("best_val_top1", "best_epoch", "epochs", "status", "images_per_s", "wall_s",
                           "skipped_shards", "stop_reason", "num_trials", "best_trial", "best_params"):
                    print(f"  {key:<15} {value}")
            for key, path in row["paths"].items():
                print(f"  {key:<15} {path}")
            if row.get("trials"):
                print()
                print(table(row["trials"]))
            emit_json(row)
            return 0
        rows = list_runs(args.storage)
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    print(table(rows) if rows else f"no runs or sweeps in {args.storage}")
    emit_json({"storage": args.storage, "runs": rows})
    return 0
