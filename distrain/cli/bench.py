"""`distrain bench shards|data|train|accuracy|all [options]`: the benchmarks; each ends with one JSON line.

    distrain bench shards [SOURCE] [--workers 1 2]     shard-writing images/s, 1 vs 2 encode workers
    distrain bench data [--shards DIR]                 train pipeline vs torchvision ImageFolder + DataLoader
    distrain bench data --engine ray_data              loader vs ray_data engine, same 2-worker run; data-node CPUs
    distrain bench train [--shards DIR]                Ray Train DDP vs plain torchrun DDP; time to first step
    distrain bench gpu --out gpu.json                  the GPU acceptance run (no Ray; README "Checking a GPU machine")
    distrain bench staged                              two-phase vs one-phase vs full fine-tuning, equal budget
    distrain bench accuracy                            Fashion-MNIST: pretrained vs random init; probe vs fine-tune
    distrain bench search [--out BENCHMARKS.md]        ASHA vs full grid; sweep best vs default; PBT vs ASHA
    distrain bench all --out BENCHMARKS.md             all of the above, written up as Markdown
Each benchmark's options: `distrain bench NAME --help`.
"""

import importlib

MODULES = {"shards": "distrain.shards.bench", "data": "distrain.data.bench", "train": "distrain.train.bench",
           "gpu": "distrain.train.bench_gpu",
           "accuracy": "distrain.benchmarks", "staged": "distrain.benchmarks",
           "search": "distrain.benchmarks", "all": "distrain.benchmarks"}


def add_arguments(parser):
    parser.add_argument("which", choices=list(MODULES), help="which benchmark")
    parser.add_argument("rest", nargs="...", help="options of that benchmark (see `distrain bench NAME --help`)")


def run(args) -> int:
    argv = list(args.rest)
    engine = args.which == "data" and any(a == "--engine" or a.startswith("--engine=") for a in argv)
    module = importlib.import_module("distrain.train.bench_engines" if engine else MODULES[args.which])
    if args.which in ("accuracy", "staged", "search", "all"):
        argv = [args.which, *argv]
    return int(module.main(argv) or 0)
