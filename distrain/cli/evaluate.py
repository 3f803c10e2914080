"""`distrain eval --model RUN/model --data SHARDS [--split test] [--workers N | --local] [--out DIR]`

Top-1, top-5, per-class precision/recall/F1 and the confusion matrix of a model/ folder on a shard split, each
sample scored exactly once. `--data` is a shards folder (split from `--split`, default test, else val) or
`SHARDS/<split>`. With `--workers N` (N > 1) N Ray tasks each evaluate their exact-once share and the driver adds
up their confusion matrices; `--workers 1` or `--local` runs in this process without Ray. Writes metrics.json,
confusion.png and errors.png (the most confident mistakes) to `--out` (default `<model>/../eval-<split>`) and
ends with one JSON line: top1, top5, count, macro_f1, metrics_json, confusion_png, errors_png.
"""

from distrain.cli import CommandError, count, emit_json


def add_arguments(parser):
    parser.add_argument("--model", "-m", required=True, help="a model/ folder written by `distrain train`")
    parser.add_argument("--data", "-d", required=True, help="shards folder (or SHARDS/<split>), local or URL")
    parser.add_argument("--split", help="split to evaluate (default: test if the shards have one, else val)")
    parser.add_argument("--out", "-o", help="output folder (default: <model>/../eval-<split>)")
    parser.add_argument("--workers", "-w", type=count(1), default=1,
                        help="Ray tasks, each evaluating its exact-once share (default 1 = in this process)")
    parser.add_argument("--local", action="store_true", help="run in this process without Ray")
    parser.add_argument("--batch-size", type=count(1), default=64)
    parser.add_argument("--loader-workers", type=count(0), default=1, help="decode processes per worker")
    parser.add_argument("--worst", type=count(0), default=16, help="misclassified images in errors.png")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                        help="autocast on GPU (CPU always runs float32)")
    parser.add_argument("--device", default="auto", help="in-process device: auto, cpu, cuda, cuda:1")
    parser.add_argument("--gpu", default="auto", choices=["auto", "true", "false"],
                        help="one GPU per Ray worker (auto: when the cluster has GPUs)")
    parser.add_argument("--cpus-per-worker", type=count(0), default=0, help="Ray worker CPUs (0: loader workers + 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from distrain.data.sources import DataError
    from distrain.inference.evaluate import EvalError, evaluate_model, format_report
    from distrain.models.folder import ModelDirError

    try:
        result = evaluate_model(args.model, args.data, args.split, out_dir=args.out, workers=args.workers,
                                local=args.local, batch_size=args.batch_size, loader_workers=args.loader_workers,
                                amp=args.amp, worst=args.worst, device=args.device, use_gpu=args.gpu,
                                cpus_per_worker=args.cpus_per_worker, progress=not args.no_progress)
    except (EvalError, ModelDirError, DataError) as e:
        raise CommandError(str(e)) from None
    print(format_report(result))
    emit_json({k: result[k] for k in ("top1", "top5", "count", "macro_f1", "metrics_json", "confusion_png",
                                      "errors_png", "split", "workers", "decode_errors", "images_per_s")})
    return 0
