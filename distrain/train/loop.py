"""The per-worker training loop that Ray Train runs on every DDP rank.

Usage (driver side, see distrain/train/run.py):
    TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg.to_dict(), ...}, ...)

One epoch on every rank: stream this rank's share of the shards (every rank gets exactly the same number of
batches, so no rank waits forever at an all-reduce), step the optimizer with warmup + cosine per step, then
validate exactly once across ranks (sums all-reduced), then `ray.train.report` from all ranks with rank 0 attaching
the checkpoint. Freezing is settled before the DDP wrap, so frozen parameters never need gradient buckets and
`find_unused_parameters=False` holds.

A checkpoint holds the trainable weights only (the frozen part is named by its source and rebuilt from it),
unless `model.save_frozen`, plus optimizer, scheduler, grad scaler, epoch, step, data position and the history of
epoch metrics, so resuming needs nothing but the checkpoint and the same config.

Fault hook for tests and drills: DISTRAIN_FAULT="epoch=E,step=S,rank=R" makes that rank exit abruptly at that
step of that (0-based) epoch (",kind=nan" poisons its loss instead); with DISTRAIN_FAULT_ONCE=/path the fault fires
only while that file is absent and creates it, so the replacement worker carries on. The driver forwards DISTRAIN_*
variables to the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distrain.evaluate import evaluate  # the exact-once validation `distrain eval` runs too

CHECKPOINT_META = "meta.json"
CHECKPOINT_WEIGHTS = "weights.pt"
CHECKPOINT_STATE = "train_state.pt"


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio, per optimizer step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler). AMP only on GPU: CPU autocast is slower for convnets."""
    if device.type != "cuda" or mode == "off":
        return None, False
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _maybe_fault(epoch: int, step: int, rank: int) -> str | None:
    """The fault hook (module docstring). Returns 'nan' when the loss should be poisoned instead of exiting."""
    spec = os.environ.get("DISTRAIN_FAULT")
    if not spec:
        return None
    want = dict(kv.split("=") for kv in spec.split(","))
    if (int(want.get("epoch", -1)), int(want.get("step", -1)), int(want.get("rank", 0))) != (epoch, step, rank):
        return None
    once = os.environ.get("DISTRAIN_FAULT_ONCE")
    if once:
        if Path(once).exists():
            return None
        Path(once).write_text(f"fault at epoch={epoch} step={step} rank={rank}\n")
    if want.get("kind") == "nan":
        return "nan"
    say(f"injected fault: rank {rank} exits at epoch {epoch} step {step}")
    os._exit(17)


def compute_threads(cfg, cpus_per_worker: int) -> int:
    """Threads for a worker's compute: its CPUs minus those its loader workers use (more only thrash)."""
    return max(1, cpus_per_worker - cfg.data.loader_workers)


def say(message: str) -> None:
    """One line on the driver's console. Ray Train patches `print` in workers to log *and* echo, which shows
    every line twice; writing to stdout directly shows it once."""
    sys.stdout.write(f"[distrain] {message}\n")
    sys.stdout.flush()


def param_digest(model: torch.nn.Module) -> str:
    """A digest of the parameters (not buffers: BatchNorm statistics legitimately differ between DDP replicas,
    since each rank updates them from its own batches and DDP only broadcasts rank 0's before each forward)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _all_sum(value: float, device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t.item())


class Stepper:
    """Optimizer, schedule, AMP and the step loop of one epoch. The Ray Train loop below and the plain-torchrun
    baseline of the benchmark (distrain/train/bench.py) both run exactly this, so the benchmark measures Ray's
    overhead and nothing else."""

    def __init__(self, cfg, model, ddp_model, device, micro_batches: int, num_classes: int):
        from distrain.data import Mixup
        from distrain.models import param_groups

        self.cfg, self.model, self.ddp_model, self.device = cfg, model, ddp_model, device
        self.micro_batches = micro_batches
        groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay)
        if cfg.optim.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        steps_per_epoch = max(1, micro_batches // cfg.optim.grad_accum)
        total_steps = steps_per_epoch * cfg.train.epochs
        warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, cfg.optim.min_lr_ratio))
        self.amp_dtype, self.use_scaler = amp_settings(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_scaler)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.mix = Mixup(cfg.data.mixup, cfg.data.cutmix, num_classes)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.mean, self.std = model.info.mean, model.info.std
        self.channels_last = cfg.data.channels_last
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)  # the head's

    def run_epoch(self, loader, epoch: int, world: int, log_every: int = 0, on_log=None, fault_hook=None) -> dict:
        from distrain.data import to_device

        cfg, device, accum = self.cfg, self.device, self.cfg.optim.grad_accum
        self.ddp_model.train()
        t0 = time.perf_counter()
        t_log, seen_log = t0, 0
        loss_sum, seen, decode_errors, first_step_at = 0.0, 0, 0, None
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            fault = fault_hook(i) if fault_hook else None
            x = to_device(batch.images, device, self.mean, self.std, channels_last=self.channels_last)
            y = batch.labels.to(device, non_blocking=True)
            x, target = self.mix(x, y)
            last_micro = (i + 1) % accum == 0 or i + 1 == self.micro_batches
            # Skip the gradient all-reduce on all but the last micro-batch of an accumulated step.
            no_sync = not last_micro and hasattr(self.ddp_model, "no_sync")
            with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.ddp_model(x), target)
                    if fault == "nan":
                        loss = loss * float("nan")
                self.scaler.scale(loss / accum).backward()
            loss_value = float(loss.detach())
            loss_sum += loss_value * len(y)
            seen += len(y)
            decode_errors += int(batch.decode_errors)
            if not last_micro:
                continue
            self.scaler.unscale_(self.optimizer)
            # The norm is computed after the all-reduce, so it is identical on every rank: a non-finite one
            # stops all ranks together, with no extra collective and no rank left waiting.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.optim.grad_clip or float("inf"))
            if not self.use_scaler and not torch.isfinite(grad_norm):
                return {"status": "nan", "epoch": epoch, "step": self.global_step, "first_step_at": first_step_at,
                        "message": f"loss/gradients became non-finite at epoch {epoch + 1}, step "
                                   f"{self.global_step} (loss {loss_value:.4g})"}
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            if first_step_at is None:
                first_step_at = time.time()  # wall clock: the driver compares it with its own start
            if on_log and log_every and self.global_step % log_every == 0:
                now = time.perf_counter()
                on_log(self.global_step, i, loss_value, (seen - seen_log) * world / max(1e-9, now - t_log),
                       self.lr())
                t_log, seen_log = now, seen
        return {"status": "ok", "loss_sum": loss_sum, "seen": seen, "decode_errors": decode_errors,
                "train_time": time.perf_counter() - t0, "first_step_at": first_step_at}


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    from distrain.config import from_dict
    from distrain.data import create_loader
    from distrain.models import create_model
    from distrain.shards.manifest import load_manifest
    from distrain.tracking import start_tracker

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = compute_threads(cfg, int(loop_config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # same head init on every rank (DDP also broadcasts rank 0's at wrap)

    manifest = load_manifest(cfg.data.shards)
    classes = manifest.classes
    model = create_model(cfg.model.backbone, len(classes), weights=cfg.model.weights,
                         unfreeze_depth=cfg.model.unfreeze_depth, dropout=cfg.model.dropout,
                         head_hidden=cfg.model.head_hidden)
    info = model.info
    image_size = cfg.data.image_size or info.input_size

    # ---- resume: the checkpoint Ray hands us (latest reported) or nothing
    start_epoch, global_step, history, state = 0, 0, [], None
    seed = cfg.train.seed
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = json.loads((Path(d) / CHECKPOINT_META).read_text())
            weights = torch.load(Path(d) / CHECKPOINT_WEIGHTS, map_location="cpu", weights_only=True)
            state = torch.load(Path(d) / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        if meta["classes"] != classes:
            raise ValueError(f"checkpoint has {len(meta['classes'])} classes {meta['classes'][:5]}..., the shards "
                             f"at {cfg.data.shards} have {len(classes)}: use --restart or another train.name")
        if meta.get("frozen_included"):
            model.load_state_dict(weights)
        else:
            model.load_trainable_state_dict(weights)
        start_epoch, global_step, history = meta["epoch"], meta["global_step"], meta["history"]
        seed = meta["data_position"]["seed"]
        if rank == 0:
            say(f"resuming at epoch {start_epoch + 1} (step {global_step}) from {ckpt.path}")

    model.to(device)
    if cfg.data.channels_last:  # NHWC: faster convolutions with cuDNN and with oneDNN on CPU (1.7x here)
        model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    loader_args = {"rank": rank, "world_size": world, "batch_size": cfg.data.batch_size,
                   "loader_workers": cfg.data.loader_workers, "image_size": image_size, "seed": seed,
                   "shuffle_buffer": cfg.data.shuffle_buffer, "crop_pct": info.crop_pct}
    train_loader = create_loader(manifest, cfg.data.train_split, train=True, aug_strength=cfg.data.aug_strength,
                                 limit=cfg.data.train_limit, epoch=start_epoch, **loader_args)
    val_loader = create_loader(manifest, cfg.data.val_split, train=False, aug_strength=0.0,
                               limit=cfg.data.val_limit, epoch=0, **loader_args)
    micro_batches = len(train_loader)
    stepper = Stepper(cfg, model, ddp_model, device, micro_batches, len(classes))
    if state is not None:
        stepper.load_state_dict(state)
    stepper.global_step = global_step
    trainable, mean, std = stepper.trainable, info.mean, info.std
    amp_dtype, channels_last = stepper.amp_dtype, stepper.channels_last
    misclassified_cap = cfg.wandb.max_misclassified if cfg.wandb.mode != "disabled" else 0
    tracker = start_tracker(cfg, run_name=loop_config.get("run_name", cfg.train.name),
                            job_type=loop_config.get("job_type", "train"), group=loop_config.get("group"),
                            rank=rank, run_dir=loop_config.get("run_dir"))
    if rank == 0:
        say(f"{world} worker(s) on {device.type}, {threads} thread(s) each; "
            f"{info.name} at {image_size}px, unfreeze_depth={model.unfreeze_depth}/{len(model.stages)}, "
            f"{sum(p.numel() for p in trainable):,} trainable parameters; {micro_batches} batches/epoch/rank")

    status = {"status": "ok"}
    epoch = start_epoch
    first_step_at = None
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.set_epoch(epoch)

            def on_log(step, i, loss, ips, lr, epoch=epoch):
                tracker.log_step(step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": ips,
                                        "epoch": epoch + i / micro_batches})
                if rank == 0:
                    say(f"epoch {epoch + 1}/{cfg.train.epochs} step {i + 1}/{micro_batches} "
                        f"loss {loss:.4f} lr {lr:.2e} {ips:,.0f} img/s")

            fault_hook = (lambda i, epoch=epoch: _maybe_fault(epoch, i, rank)) if "DISTRAIN_FAULT" in os.environ \
                else None
            run = stepper.run_epoch(train_loader, epoch, world, log_every=cfg.train.log_every, on_log=on_log,
                                    fault_hook=fault_hook)
            first_step_at = first_step_at or run["first_step_at"]
            if run["status"] != "ok":
                status = run
                break
            global_step = stepper.global_step

            meter, wrong, val_decode_errors = evaluate(model, val_loader, device, mean, std, amp_dtype,
                                                       len(classes), channels_last, misclassified_cap)
            val = meter.compute(classes)
            totals = [_all_sum(run[k], device) for k in ("loss_sum", "seen", "decode_errors")]
            metrics = {
                "epoch": epoch + 1,
                "train_loss": totals[0] / max(1, totals[1]),
                "lr": stepper.lr(),
                "images_per_s": totals[1] / max(1e-9, run["train_time"]),
                "epoch_time_s": run["train_time"],
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "val_count": val["count"],
                "val_per_class_acc": val["per_class_acc"],
                "decode_errors": int(totals[2]) + val_decode_errors,
                "global_step": global_step,
                "first_step_at": first_step_at,
            }
            history.append({k: v for k, v in metrics.items()})
            tracker.log_epoch(epoch + 1, metrics, val["confusion"], classes, wrong)
            if rank == 0:
                say(f"epoch {epoch + 1}/{cfg.train.epochs}: train_loss {metrics['train_loss']:.4f} "
                    f"val_loss {val['loss']:.4f} val_top1 {val['top1']:.4f} val_top5 {val['top5']:.4f} "
                    f"({val['count']} val images, {metrics['images_per_s']:,.0f} img/s)")
            position = {**train_loader.position(), "epoch": epoch + 1, "seed": seed}
            _report(ray.train, metrics, rank, model, cfg, stepper.state_dict(), classes, info,
                    image_size, epoch + 1, global_step, history, position, val["confusion"])
        # All replicas must hold the same parameters after DDP: check it rather than assume it.
        digest = param_digest(model)
        digests: list[Any] = [None] * world
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(digests, digest)
        else:
            digests = [digest]
        status["replicas_in_sync"] = len(set(digests)) == 1
        status["param_digest"] = digest
        status["history"] = history
        best = max(history, key=lambda h: h["val_top1"], default={"val_top1": 0.0, "epoch": 0})
        tracker.finish({"best_val_top1": best["val_top1"], "best_epoch": best["epoch"], "status": status["status"]})
    except BaseException:
        tracker.finish({"status": "failed"})
        raise
    return status


def _report(train_api, metrics, rank, model, cfg, train_state, classes, info, image_size,
            epoch, global_step, history, position, confusion):
    """All ranks call report (it is a barrier); only rank 0 attaches the checkpoint."""
    from dataclasses import asdict

    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-") as d:
        checkpoint = None
        if rank == 0:
            full = cfg.model.save_frozen
            weights = model.state_dict() if full else model.trainable_state_dict()
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, Path(d) / CHECKPOINT_WEIGHTS)
            torch.save(train_state, Path(d) / CHECKPOINT_STATE)
            meta = {"epoch": epoch, "global_step": global_step, "classes": classes, "history": history,
                    "data_position": position, "frozen_included": full,
                    "frozen_source": {"backbone": cfg.model.backbone, "weights": cfg.model.weights,
                                      "weights_source": info.weights_source},
                    "model": {"backbone": cfg.model.backbone, "num_classes": len(classes),
                              "head_hidden": cfg.model.head_hidden, "dropout": cfg.model.dropout,
                              "unfreeze_depth": cfg.model.unfreeze_depth, "image_size": image_size,
                              "info": asdict(info)},
                    "metrics": {k: v for k, v in metrics.items() if k != "val_per_class_acc"},
                    "confusion": confusion, "config": cfg.to_dict()}
            (Path(d) / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, default=str))
            checkpoint = train_api.Checkpoint.from_directory(d)
        train_api.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
