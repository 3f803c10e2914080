"""`distrain predict --model RUN/model IMAGE_OR_FOLDER ... [--top-k 5] [--out preds.csv|.json|.jsonl|.parquet]`

Class names and probabilities per image, in this process. Folders are searched recursively for image files. A
file that cannot be read or decoded is reported on its own row (and on stderr); the others go on.

Shards at scale, as a Ray Data batch job (an actor pool, one GPU per actor when the cluster has GPUs):
    distrain predict --model RUN/model --shards SHARDS --split test --out preds.parquet   # or .csv/.jsonl,
                                                                  # a bucket URL, or a folder URL ending in '/'
Ends with one JSON line: count, errors, out (and top1 against the shards' labels).
"""

from distrain.cli import CommandError, count, emit_json


def add_arguments(parser):
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files and folders")
    parser.add_argument("--model", "-m", required=True, help="a model/ folder written by `distrain train`")
    parser.add_argument("--top-k", "-k", type=count(1), default=5, help="classes per image (default 5)")
    parser.add_argument("--out", "-o", help="write predictions: .csv, .json, .jsonl or .parquet (local or URL)")
    parser.add_argument("--shards", help="predict a shard split with Ray Data instead of files")
    parser.add_argument("--split", help="with --shards: the split (default test, else val)")
    parser.add_argument("--batch-size", type=count(1), default=64)
    parser.add_argument("--device", default="auto", help="for files: auto, cpu, cuda")
    parser.add_argument("--concurrency", type=count(1), default=1, help="with --shards: predictor actors")
    parser.add_argument("--cpus-per-actor", type=count(1), default=1)
    parser.add_argument("--gpu", default="auto", choices=["auto", "true", "false"],
                        help="with --shards: one GPU per actor (auto: when the cluster has GPUs)")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import sys

    from distrain.data.sources import DataError
    from distrain.inference.evaluate import EvalError
    from distrain.inference.predict import PredictError, Predictor, list_images, predict_shards, write_predictions
    from distrain.models.folder import ModelDirError

    if args.top_k < 1:
        raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
    try:
        if args.shards:
            if args.inputs:
                raise CommandError("give either image files/folders or --shards, not both")
            if not args.out:
                raise CommandError("--shards needs --out (a .csv, .jsonl or .parquet file, or a folder URL ending "
                                   "in '/')")
            summary = predict_shards(args.model, args.shards, args.split, args.out, top_k=args.top_k,
                                     batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=args.gpu,
                                     cpus_per_actor=args.cpus_per_actor, progress=not args.no_progress)
            top1 = f", top-1 {summary['top1']:.4f} on {summary['labelled']} labelled" if summary["top1"] is not None \
                else ""
            print(f"{summary['count']} samples of {summary['data']} split '{summary['split']}' → {summary['out']} "
                  f"({summary['errors']} undecodable{top1}; {summary['images_per_s']:,.0f} img/s)")
            emit_json(summary)
            return 0
        if not args.inputs:
            raise CommandError("give image files or folders, or --shards DIR")
        paths, ignored = list_images(args.inputs)
        if not paths:
            raise CommandError(f"no image files in {', '.join(args.inputs)}"
                               + (f" ({ignored} non-image file(s) left out)" if ignored else ""))
        predictor = Predictor.from_dir(args.model, args.device, args.batch_size)
        rows = predictor.predict_files(paths, args.top_k, progress=not args.no_progress and len(paths) > 1)
        if args.out:
            write_predictions(rows, args.out, min(args.top_k, len(predictor.classes)))
    except (PredictError, EvalError, ModelDirError, DataError) as e:
        raise CommandError(str(e)) from None
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"distrain predict: {r['path']}: {r['error']}", file=sys.stderr)
    if not args.out:
        for r in rows:
            if not r["error"]:
                print(f"{r['path']}\t" + "  ".join(f"{c} {p:.4f}" for c, p in zip(r["classes"], r["probs"],
                                                                                    strict=True)))
    print(f"{len(rows) - len(errors)} image(s) classified, {len(errors)} unreadable"
          + (f", {ignored} non-image file(s) left out" if ignored else "")
          + (f"; wrote {args.out}" if args.out else ""))
    emit_json({"count": len(rows), "classified": len(rows) - len(errors), "errors": len(errors),
               "ignored": ignored, "out": args.out,
               "error_files": [r["path"] for r in errors][:20]})
    return 0
