"""Benchmark: Ray Train DDP vs plain `torchrun` DDP on the same model, batch and data, in the same run.

Usage:
    distrain bench train [--shards DIR] [--workers 2] [--image-size 64]     (or python -m distrain.train.bench)

Both sides run `Stepper.run_epoch` from distrain/train/loop.py (the same optimizer, schedule, loss, data loader
and thread count), so the ratio is Ray Train's overhead and nothing else. Throughput is that of the last epochs
(the first includes warm-up), in images/s over all workers. `first_step_s` is the time from calling `fit()` on a
running local cluster to the first optimizer step (worker start-up, model build, first batch);
`cold_first_step_s` adds starting the cluster itself. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_overrides(shards: str, storage: str, num_workers: int, image_size: int, batch_size: int,
                    epochs: int, backbone: str, unfreeze_depth, train_limit: int) -> dict:
    return {"data.shards": shards, "data.image_size": image_size, "data.batch_size": batch_size,
            "data.loader_workers": 0, "data.aug_strength": 0.0, "data.train_limit": train_limit,
            "data.val_limit": 256, "model.backbone": backbone, "model.unfreeze_depth": unfreeze_depth,
            "train.epochs": epochs, "train.name": "bench_train", "train.log_every": 10_000,
            "scaling.num_workers": num_workers, "scaling.storage_path": storage, "wandb.mode": "disabled"}


def ddp_baseline(overrides: dict) -> dict:
    """One torchrun rank: the same epochs as the Ray run, under a plain torch.distributed process group."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distrain.config import load_config
    from distrain.data import create_loader
    from distrain.models import create_model
    from distrain.shards.manifest import load_manifest
    from distrain.train.loop import Stepper, compute_threads

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, overrides)
    torch.set_num_threads(compute_threads(cfg, cfg.data.loader_workers + 1))
    torch.manual_seed(cfg.train.seed)
    manifest = load_manifest(cfg.data.shards)
    model = create_model(cfg.model.backbone, manifest.num_classes, weights=cfg.model.weights,
                         unfreeze_depth=cfg.model.unfreeze_depth, dropout=cfg.model.dropout)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    loader = create_loader(manifest, cfg.data.train_split, train=True, rank=rank, world_size=world,
                           batch_size=cfg.data.batch_size, loader_workers=cfg.data.loader_workers,
                           image_size=cfg.data.image_size, aug_strength=cfg.data.aug_strength, seed=cfg.train.seed,
                           limit=cfg.data.train_limit, crop_pct=model.info.crop_pct)
    stepper = Stepper(cfg, model, ddp, torch.device("cpu"), len(loader), manifest.num_classes)
    rates = []
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        run = stepper.run_epoch(loader, epoch, world)
        seen = torch.tensor([float(run["seen"])])
        dist.all_reduce(seen)
        rates.append(float(seen) / run["train_time"])
    dist.destroy_process_group()
    return {"images_per_s_per_epoch": rates}


def _mean_after_first(rates: list[float]) -> float:
    tail = rates[1:] or rates
    return sum(tail) / len(tail)


def benchmark(shards: str | None = None, *, num_workers: int = 2, image_size: int = 64, batch_size: int = 32,
              epochs: int = 3, backbone: str = "mobilenet_v2", unfreeze_depth=2, train_limit: int = 6144,
              work_dir: str | None = None, log=print) -> dict:
    from distrain import runtime
    from distrain.config import load_config
    from distrain.train.run import fit

    work = Path(work_dir or tempfile.mkdtemp(prefix="distrain-bench-train-"))
    if shards is None:
        from distrain.shards.build import BuildOptions, build_shards

        shards = str(work / "fashion-mnist")
        if not (Path(shards) / "manifest.json").exists():
            log(f"building a Fashion-MNIST subset in {shards}")
            build_shards("fashion-mnist", shards, BuildOptions(limit=train_limit + 512, workers=1, overwrite=True))
    overrides = bench_overrides(shards, str(work / "runs"), num_workers, image_size, batch_size, epochs,
                                backbone, unfreeze_depth, train_limit)
    cfg = load_config(None, overrides)

    t_cold = time.perf_counter()
    started_here = False
    import ray

    if not ray.is_initialized():
        runtime.connect(num_cpus=max(os.cpu_count() or 2, num_workers), log_to_driver=False)
        started_here = True
    init_s = time.perf_counter() - t_cold
    log(f"Ray Train: {num_workers} workers, {backbone} at {image_size}px, batch {batch_size}/worker, {epochs} epochs")
    summary = fit(cfg, restart=True)
    ray_rates = [h["images_per_s"] for h in summary["history"]]
    if started_here:
        ray.shutdown()

    log(f"torchrun baseline: {num_workers} processes, same model, batch, data and threads")
    # GLOO_SOCKET_IFNAME=lo: the baseline's collectives stay on loopback, like those of the local Ray cluster.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_workers}",
           "-m", "distrain.train.bench", "--ddp-baseline", json.dumps(overrides)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"torchrun baseline failed:\n{out.stderr[-3000:]}")
    baseline = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    base_rates = baseline["images_per_s_per_epoch"]

    ray_ips, base_ips = _mean_after_first(ray_rates), _mean_after_first(base_rates)
    log(f"Ray Train {ray_ips:.1f} images/s, torchrun {base_ips:.1f} images/s: ratio {ray_ips / base_ips:.3f}; "
        f"first step {summary.get('first_step_s')} s after fit() ({init_s + (summary.get('first_step_s') or 0):.1f} s "
        "with starting Ray)")
    return {"images_per_s": round(ray_ips, 1), "baseline_images_per_s": round(base_ips, 1),
            "ratio": round(ray_ips / base_ips, 3), "first_step_s": summary.get("first_step_s"),
            "cold_first_step_s": round(init_s + (summary.get("first_step_s") or 0), 1),
            "ray_images_per_s_per_epoch": [round(r, 1) for r in ray_rates],
            "baseline_images_per_s_per_epoch": [round(r, 1) for r in base_rates],
            "workers": num_workers, "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
            "unfreeze_depth": unfreeze_depth, "epochs": epochs, "train_samples_per_epoch": train_limit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ddp-baseline", metavar="OVERRIDES_JSON", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.ddp_baseline:
        result = ddp_baseline(json.loads(args.ddp_baseline))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return 0
    figures = run_from_args(args)
    print(json.dumps(figures), flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shards folder (default: a Fashion-MNIST subset built on the fly)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--unfreeze-depth", default="2")
    parser.add_argument("--train-limit", type=int, default=6144)


def run_from_args(args) -> dict:
    depth = args.unfreeze_depth if args.unfreeze_depth == "all" else int(args.unfreeze_depth)
    return benchmark(args.shards, num_workers=args.workers, image_size=args.image_size, batch_size=args.batch_size,
                     epochs=args.epochs, backbone=args.backbone, unfreeze_depth=depth, train_limit=args.train_limit)


if __name__ == "__main__":
    sys.exit(main())
