"""The GPU acceptance run: `distrain bench gpu --out FILE`, one command, a few minutes on one GPU, no Ray.

Usage:
    python3 -m distrain bench gpu --out gpu.json         # on the GPU machine (README: "Checking a GPU machine")
    python3 -m distrain.train.bench_gpu --device cpu --quick --out x.json   # the same code on a CPU (the suite)

What it measures, each figure in images/s of training steps (steps after the first `warmup` of each run):
    ResNet-50, full fine-tune, bf16, channels_last     synthetic batches already on the device (the ceiling) vs
                                                       real shards with data.decode=cpu vs data.decode=gpu
    the frozen-base recipe (MobileNetV2, 224 px,       the same three
      unfreeze_depth 0)
    checks     a 1-process NCCL DDP step (process group, all-reduce, replicas identical after training), fp16 with a
               GradScaler and bf16 losses finite, loader batches in pinned memory (copies are non_blocking)
    resources  peak GPU memory and mean GPU utilisation (NVML) during each real-data run
It generates its own shards first: ~4,000 photo-like JPEGs of ~500 px written by distrain's shard writer on all
cores; epochs read them several times over (the train split lists the shards `repeat` times), so a run is long
enough to time without generating more.

Every side is built by the same code as real training: `core.setup` (model, freezing, channels_last, the DDP wrap,
loaders from the config) and `Stepper.run_epoch`; the synthetic side replaces only the loader, with one prepared
batch handed out again and again, so each ratio measures only the input pipeline. It imports neither Ray nor W&B,
and nothing pinned to this project's torch (the GPU machine has its own torch ≥ 2.11). Without CUDA it prints
`{"cuda_available": false, ...}` and exits 3. The last line printed is the JSON written to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

TARGETS = {"resnet50_real_vs_synthetic": 0.9, "resnet50_images_per_s": 3000.0,
           "frozen_gpu_vs_synthetic": 0.8, "frozen_gpu_vs_cpu": 2.0}
RECIPES = {  # name → config overrides (both at 224 px, bf16, channels_last)
    "resnet50_full": {"model.backbone": "torchvision:resnet50", "model.unfreeze_depth": "all",
                      "data.batch_size": 256},
    "frozen_mobilenet_v2": {"model.backbone": "torchvision:mobilenet_v2", "model.unfreeze_depth": 0,
                            "data.batch_size": 256},
}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- shards


def _images_chunk(args) -> None:
    from distrain.shards.bench import make_bench_images

    root, n, start, side = args
    make_bench_images(root, n, side, num_classes=10, start=start)


def make_shards(work: Path, images: int, side: int, repeat: int, workers: int, log) -> str:
    """~`side` px JPEG shards of `images` photo-like images; a manifest whose train split lists them `repeat`
    times. Returns the shards folder."""
    from concurrent.futures import ProcessPoolExecutor

    from distrain.shards.build import BuildOptions, build_shards
    from distrain.shards.manifest import load_manifest, save_manifest

    folder, out = work / "images", work / "shards"
    t0 = time.perf_counter()
    per = -(-images // workers)
    chunks = [(str(folder), min(per, images - s), s, side) for s in range(0, images, per)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_images_chunk, chunks))
    result = build_shards(str(folder), str(out), BuildOptions(workers=workers, shard_size=250, val_fraction=0.05,
                                                              overwrite=True))
    shards = sum(len(split.shards) for split in result.manifest.splits.values())
    log(f"{images} JPEGs of ~{side} px → {shards} shards in {time.perf_counter() - t0:.1f} s ({workers} processes)")
    m = load_manifest(str(out))
    train = m.splits["train"]
    train.shards = train.shards * repeat
    train.num_samples *= repeat
    if train.class_counts:
        train.class_counts = [c * repeat for c in train.class_counts]
    save_manifest(m, str(out))
    return str(out)


# ----------------------------------------------------------------------------------------------- timing


class _Timed:
    """Wraps a loader: records when batch `warmup` is handed out (after the device caught up), so the rate counts
    only steady-state steps."""

    def __init__(self, loader, warmup: int, sync):
        self.loader, self.warmup, self.sync = loader, warmup, sync
        self.t_start: float | None = None
        self.counted = 0
        self.pinned: bool | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.pinned is None:
                self.pinned = bool(batch.images.is_pinned())
            if i == self.warmup:
                self.sync()
                self.t_start = time.perf_counter()
            if i >= self.warmup:
                self.counted += len(batch)
            yield batch


class _Repeat:
    """The synthetic side: one real batch, handed out `n` times (its prepared tensor is cached on the device)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


class _Utilisation:
    """Mean GPU utilisation (NVML, sampled every 0.1 s) while running; None where NVML is missing."""

    def __init__(self, device):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self.handle = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML: utilisation is reported as null
            self.handle = None

    def __enter__(self):
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def measure(cfg, manifest, device, mode: str, steps: int, warmup: int) -> dict:
    """One run: `mode` = synthetic | cpu | gpu; images/s over the steps after `warmup`, peak memory, utilisation."""
    import torch

    from distrain.train.core import setup

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    w = setup(cfg, manifest, rank=0, world=1, device=device, decode="cpu" if mode == "synthetic" else mode)
    w.begin_epoch(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "synthetic":
        batch = next(iter(w.train_loader))
        x = w.prepare(batch)  # on the device, normalized: the ceiling has no input pipeline at all
        w.stepper.prepare = lambda _b: x
        loader = _Timed(_Repeat(batch, warmup + steps), warmup, sync)
    else:
        loader = _Timed(w.train_loader, warmup, sync)
    with _Utilisation(device) if cuda and mode != "synthetic" else _NoUtil() as util:
        run = w.stepper.run_epoch(loader, 0, 1)
        sync()
    t_end = time.perf_counter()
    if run["status"] != "ok":
        raise RuntimeError(f"{mode} run ended {run['status']}: {run.get('message', '')}")
    rate = loader.counted / max(1e-9, t_end - (loader.t_start or t_end))
    out = {"images_per_s": round(rate, 1), "steps": len(loader) - warmup, "loss": round(run["loss_sum"] /
                                                                                          max(1, run["seen"]), 4)}
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if mode != "synthetic":
        out["gpu_utilisation_pct"] = util.mean
        out["pinned"] = loader.pinned
    del w
    return out


class _NoUtil:
    mean = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def checks(cfg, manifest, device) -> dict:
    """NCCL DDP (process group, all-reduce, replicas identical), fp16 + GradScaler and bf16 losses finite."""
    import torch
    import torch.distributed as dist

    from distrain.train.core import check_replicas, setup

    out = {"backend": dist.get_backend()}
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    out["all_reduce_ok"] = bool(torch.equal(t, torch.full_like(t, dist.get_world_size())))
    for amp in (("fp16", "bf16") if device.type == "cuda" else ("off",)):
        c = cfg.replace({"train.amp": amp})
        w = setup(c, manifest, rank=0, world=1, device=device, decode="cpu")
        w.begin_epoch(0)
        # core.wrap leaves a single process unwrapped; here DDP goes on anyway, so its reducer and NCCL's
        # all-reduce of every gradient bucket run for real.
        ids = [device.index or 0] if device.type == "cuda" else None
        w.stepper.ddp_model = w.ddp_model = torch.nn.parallel.DistributedDataParallel(w.model, device_ids=ids)
        batch = next(iter(w.train_loader))
        run = w.stepper.run_epoch(_Repeat(batch, 8), 0, 1)
        loss = run.get("loss_sum", float("nan")) / max(1, run.get("seen", 0))
        out[f"{amp}_loss_finite"] = run["status"] == "ok" and math.isfinite(loss)
        out[f"{amp}_grad_scaler"] = bool(w.stepper.use_scaler)
        out["ddp_wrapped"] = type(w.ddp_model).__name__ == "DistributedDataParallel"
        out["replica_digest"] = check_replicas(w.model)  # all-gathers each rank's digest; raises on a mismatch
        out["replicas_identical"] = True
        del w
    return out


# ----------------------------------------------------------------------------------------------- the run


def overrides(shards: str, work: Path, recipe: dict, image_size: int, loader_workers: int, quick: bool) -> dict:
    o = {"data.shards": shards, "data.image_size": image_size, "data.loader_workers": loader_workers,
         "data.aug_strength": 0.3, "data.val_limit": 64, "model.weights": "none", "train.amp": "bf16",
         "train.epochs": 1, "train.name": "bench_gpu", "scaling.num_workers": 1,
         "scaling.storage_path": str(work / "runs"), "wandb.mode": "disabled", "data.channels_last": True,
         "optim.warmup_epochs": 0.0}
    o.update(recipe)
    if quick:
        o["data.batch_size"] = 8
    return o


def benchmark(*, device: str = "cuda", images: int = 4000, side: int = 500, repeat: int = 8, steps: int = 60,
              warmup: int = 10, image_size: int = 224, quick: bool = False, work_dir: str | None = None,
              log=print) -> dict:
    import torch
    import torch.distributed as dist

    from distrain.config import load_config
    from distrain.shards.manifest import load_manifest

    dev = torch.device(device)
    cores = _cores()
    work = Path(work_dir or tempfile.mkdtemp(prefix="distrain-bench-gpu-"))
    shards = make_shards(work, images, side, repeat, max(1, cores), log)
    manifest = load_manifest(shards)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    torch.backends.cudnn.benchmark = True
    loader_workers = max(1, cores - 2)  # the training process and the pin-memory thread keep a core each
    figures: dict = {"cuda_available": torch.cuda.is_available(), "device": str(dev), "cores": cores,
                     "loader_workers": loader_workers, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                     "images": images, "image_side": side, "image_size": image_size}
    try:
        for name, recipe in RECIPES.items():
            cfg = load_config(None, overrides(shards, work, recipe, image_size, loader_workers, quick))
            per_step = cfg.data.batch_size
            steps_here = max(1, min(steps, manifest.splits["train"].num_samples // per_step - warmup))
            cfg = cfg.replace({"data.train_limit": (warmup + steps_here) * per_step})
            row: dict = {"batch_size": per_step, "backbone": cfg.model.backbone,
                         "unfreeze_depth": cfg.model.unfreeze_depth}
            for mode in ("synthetic", "cpu", "gpu"):
                log(f"{name}: {mode} ...")
                row[mode] = measure(cfg, manifest, dev, mode, steps_here, warmup)
                log(f"{name}: {mode} {row[mode]['images_per_s']:.0f} images/s")
            synth = row["synthetic"]["images_per_s"]
            row["cpu_vs_synthetic"] = round(row["cpu"]["images_per_s"] / synth, 3)
            row["gpu_vs_synthetic"] = round(row["gpu"]["images_per_s"] / synth, 3)
            row["gpu_vs_cpu"] = round(row["gpu"]["images_per_s"] / max(1e-9, row["cpu"]["images_per_s"]), 3)
            figures[name] = row
        figures["checks"] = checks(load_config(None, overrides(shards, work, RECIPES["frozen_mobilenet_v2"],
                                                               image_size, loader_workers, True)), manifest, dev)
    finally:
        dist.destroy_process_group()
    figures["targets"] = targets(figures) if dev.type == "cuda" else None
    return figures


def targets(f: dict) -> dict:
    """Met / not met, from the figures (issue 15's targets, for one H200)."""
    r, fz = f["resnet50_full"], f["frozen_mobilenet_v2"]
    best = max(r["cpu"]["images_per_s"], r["gpu"]["images_per_s"])
    c = f["checks"]
    return {
        "resnet50_real_at_least_0.9x_synthetic": best / r["synthetic"]["images_per_s"] >= TARGETS[
            "resnet50_real_vs_synthetic"],
        "resnet50_at_least_3000_images_per_s": best >= TARGETS["resnet50_images_per_s"],
        "frozen_gpu_decode_at_least_0.8x_synthetic": fz["gpu_vs_synthetic"] >= TARGETS["frozen_gpu_vs_synthetic"],
        "frozen_gpu_decode_at_least_2x_cpu": fz["gpu_vs_cpu"] >= TARGETS["frozen_gpu_vs_cpu"],
        "nccl_ddp_ok": c["backend"] == "nccl" and c["all_reduce_ok"] and c["replicas_identical"],
        "amp_losses_finite": bool(c.get("fp16_loss_finite") and c.get("bf16_loss_finite")),
        "pinned_copies": bool(r["cpu"].get("pinned") and fz["cpu"].get("pinned")),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from distrain.config.args import count

    parser.add_argument("--out", help="also write the JSON line to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to run the same code on a CPU")
    parser.add_argument("--images", type=count(1), default=4000, help="JPEGs to generate (default 4000)")
    parser.add_argument("--side", type=count(16), default=500, help="their longer side in px (default 500)")
    parser.add_argument("--steps", type=count(1), default=60, help="timed steps per run (default 60)")
    parser.add_argument("--warmup", type=count(1), default=10, help="untimed steps first (default 10)")
    parser.add_argument("--image-size", type=count(16), default=224, help="model input size (default 224)")
    parser.add_argument("--work-dir", help="where the shards go (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="batch 8 (the suite's CPU check)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        figures = {"cuda_available": False, "torch": torch.__version__,
                   "reason": "torch.cuda.is_available() is False: no GPU, or a CPU-only torch build"}
        print(json.dumps(figures), flush=True)
        _write(args.out, figures)
        return 3
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    figures = benchmark(device=args.device, images=args.images, side=args.side, steps=args.steps,
                        warmup=args.warmup, image_size=args.image_size, quick=args.quick, work_dir=args.work_dir,
                        log=log)
    if figures["targets"]:
        log(", ".join(f"{k}: {'met' if v else 'not met'}" for k, v in figures["targets"].items()))
    print(json.dumps(figures), flush=True)
    _write(args.out, figures)
    return 0


def _write(path: str | None, figures: dict) -> None:
    if path:
        from distrain import storage

        storage.write_json(path, figures)


if __name__ == "__main__":
    sys.exit(main())
