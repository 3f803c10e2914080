"""Benchmark: distrain under Ray Train vs the same step core under torchrun vs a bare Ray Train loop, in one run.

Usage:
    distrain bench train [--shards DIR] [--workers 1 2] [--image-size 64]     (or python -m distrain.train.bench)

All three sides are built by the same setup code, `distrain.train.core.setup` (model, freezing, channels_last, DDP
wrap, optimizer, loaders from the same config), so each ratio measures only what it names:
    distrain / torchrun      distrain's Ray Train loop vs the same `Stepper.run_epoch` under `torch.distributed.run`
                             (Ray's cost plus distrain's loop);
    bare Ray / torchrun      a minimal Ray Train worker (forward, backward, optimizer step; one report per epoch; no
                             distrain loop) vs torchrun: Ray's own cost;
    distrain / bare Ray      distrain's loop (tracking, validation, checkpoints aside) vs the bare loop under Ray.
Throughput is that of the epochs after the first (the first includes warm-up), training steps only (validation and
checkpoints are not timed), in images/s over all workers. The last line printed is JSON.
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

TARGETS = {"distrain_vs_bare": 0.97, "distrain_vs_torchrun_1_worker": 0.93}


def bench_overrides(shards: str, storage: str, num_workers: int, image_size: int, batch_size: int,
                    epochs: int, backbone: str, unfreeze_depth, train_limit: int, name: str = "bench_train") -> dict:
    return {"data.shards": shards, "data.image_size": image_size, "data.batch_size": batch_size,
            "data.loader_workers": 0, "data.aug_strength": 0.0, "data.train_limit": train_limit,
            "data.val_limit": 256, "model.backbone": backbone, "model.unfreeze_depth": unfreeze_depth,
            "train.epochs": epochs, "train.name": name, "train.log_every": 10_000,
            "scaling.num_workers": num_workers, "scaling.storage_path": storage, "wandb.mode": "disabled"}


def _core(cfg, rank: int, world: int):
    """The shared setup: what every side of the benchmark trains with."""
    import torch

    from distrain.shards.manifest import load_manifest
    from distrain.train.core import compute_threads, setup
    from distrain.train.placement import cpus_per_worker

    torch.set_num_threads(compute_threads(cfg, cpus_per_worker(cfg)))
    return setup(cfg, load_manifest(cfg.data.shards), rank=rank, world=world, device=torch.device("cpu"))


def _bare_epoch(w) -> tuple[int, float]:
    """A minimal DDP training epoch: forward, loss, backward, step; no clipping, schedule, logging or checks."""
    import torch

    model, opt, prepare = w.ddp_model, w.stepper.optimizer, w.prepare
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, t0 = 0, time.perf_counter()
    for batch in w.train_loader:
        loss = loss_fn(model(prepare(batch)), batch.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(batch.labels)
    return seen, time.perf_counter() - t0


def _rates(w, cfg, bare: bool) -> list[float]:
    from distrain.train.core import all_sum

    rates = []
    for epoch in range(cfg.train.epochs):
        w.begin_epoch(epoch)
        if bare:
            seen, seconds = _bare_epoch(w)
        else:
            run = w.stepper.run_epoch(w.train_loader, epoch, w.world)
            seen, seconds = run["seen"], run["train_time"]
        rates.append(all_sum(seen, w.device) / max(1e-9, seconds))
    return rates


def ddp_baseline(overrides: dict) -> dict:
    """One torchrun rank: the same epochs as the Ray run, under a plain torch.distributed process group."""
    import torch.distributed as dist

    from distrain.config import load_config

    dist.init_process_group("gloo")
    cfg = load_config(None, overrides)
    w = _core(cfg, dist.get_rank(), dist.get_world_size())
    rates = _rates(w, cfg, bare=False)
    dist.destroy_process_group()
    return {"images_per_s_per_epoch": rates}


def bare_ray_loop(config: dict) -> dict:
    """The bare Ray Train worker: the shared setup, a minimal step loop, one report (a barrier) per epoch."""
    import ray.train

    from distrain.config import from_dict

    cfg = from_dict(config)
    ctx = ray.train.get_context()
    w = _core(cfg, ctx.get_world_rank(), ctx.get_world_size())
    rates = []
    for rate in _rates(w, cfg, bare=True):
        rates.append(rate)
        ray.train.report({"images_per_s": rate})
    return {"rates": rates}


def _bare_ray(cfg) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distrain.train.placement import worker_resources

    trainer = TorchTrainer(bare_ray_loop, train_loop_config=cfg.to_dict(),
                           scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=False,
                                                        resources_per_worker=worker_resources(cfg, False)),
                           run_config=RunConfig(name="bench_bare_ray", storage_path=cfg.scaling.storage_path))
    result = trainer.fit()
    return [float(r) for r in (result.return_value or {}).get("rates", [])]


def _mean_after_first(rates: list[float]) -> float:
    tail = rates[1:] or rates
    return sum(tail) / len(tail)


def _torchrun(overrides: dict, num_workers: int) -> list[float]:
    # GLOO_SOCKET_IFNAME=lo: the baseline's collectives stay on loopback, like those of the local Ray cluster.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_workers}",
           "-m", "distrain.train.bench", "--ddp-baseline", json.dumps(overrides)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"torchrun baseline failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])[
        "images_per_s_per_epoch"]


def benchmark(shards: str | None = None, *, num_workers: int = 2, image_size: int = 64, batch_size: int = 32,
              epochs: int = 3, backbone: str = "mobilenet_v2", unfreeze_depth=2, train_limit: int = 6144,
              work_dir: str | None = None, log=print) -> dict:
    import ray

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
    started_here = not ray.is_initialized()
    if started_here:
        runtime.connect(num_cpus=max(os.cpu_count() or 2, num_workers), log_to_driver=False)
    init_s = time.perf_counter() - t_cold
    log(f"{num_workers} worker(s), {backbone} at {image_size}px, batch {batch_size}/worker, {epochs} epochs")
    log("1/3 distrain under Ray Train")
    summary = fit(cfg, restart=True)
    distrain_rates = [h["images_per_s"] for h in summary["history"]]
    log("2/3 bare Ray Train loop (the same setup, a minimal step loop)")
    bare_rates = _bare_ray(cfg)
    if started_here:
        ray.shutdown()
    log("3/3 the same step core under torchrun")
    base_rates = _torchrun(overrides, num_workers)

    ips, bare, base = (_mean_after_first(r) for r in (distrain_rates, bare_rates, base_rates))
    ratios = {"distrain_vs_torchrun": round(ips / base, 3), "bare_ray_vs_torchrun": round(bare / base, 3),
              "distrain_vs_bare_ray": round(ips / bare, 3)}
    met = {"distrain_within_3pct_of_bare_ray": ips / bare >= TARGETS["distrain_vs_bare"]}
    if num_workers == 1:
        met["distrain_at_least_0.93x_torchrun"] = ips / base >= TARGETS["distrain_vs_torchrun_1_worker"]
    log(f"distrain {ips:.1f}, bare Ray {bare:.1f}, torchrun {base:.1f} images/s: " +
        ", ".join(f"{k} {v}" for k, v in ratios.items()) + "; " +
        ", ".join(f"{k}: {'met' if v else 'not met'}" for k, v in met.items()))
    return {"images_per_s": round(ips, 1), "bare_ray_images_per_s": round(bare, 1),
            "baseline_images_per_s": round(base, 1), **ratios, "ratio": ratios["distrain_vs_torchrun"],
            "targets": met, "first_step_s": summary.get("first_step_s"),
            "cold_first_step_s": round(init_s + (summary.get("first_step_s") or 0), 1),
            "distrain_images_per_s_per_epoch": [round(r, 1) for r in distrain_rates],
            "bare_ray_images_per_s_per_epoch": [round(r, 1) for r in bare_rates],
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
