"""The function Ray Train runs on every DDP rank: the step core (core.py) plus reporting, checkpoints and W&B.

Usage (driver side, see distrain/train/run.py):
    TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg.to_dict(), "cpus_per_worker": 2}, ...)

One epoch on every rank: stream this rank's share of the shards (every rank gets exactly the same number of batches,
so no rank waits forever at an all-reduce), step the optimizer, validate exactly once across ranks (sums
all-reduced), then `ray.train.report` from all ranks with rank 0 attaching the checkpoint. Freezing is settled
before each DDP wrap, so frozen parameters never need gradient buckets and `find_unused_parameters=False` holds.

A checkpoint holds the weights that trained (the frozen part is named by its source and rebuilt from it, unless
`model.save_frozen`), the optimizer, scheduler and grad scaler, the epoch, step, phase, data position and the
history of epoch metrics, so resuming needs nothing but the checkpoint and the same config.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from distrain import console, storage
from distrain.console import say, warn
from distrain.train import checkpoint
from distrain.train.core import all_gather, all_sum, compute_threads, param_digest, setup


def _resume_point(cfg):
    """The checkpoint Ray hands this run (its latest, after a restart or a rerun), loaded; else the one in
    train.init_from (another run's: PBT's exploit), marked `init`; or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        if not cfg.train.init_from:
            return None
        loaded = checkpoint.read(cfg.train.init_from)
        loaded.path, loaded.init = cfg.train.init_from, True
        return loaded
    with ckpt.as_directory() as d:
        loaded = checkpoint.read(d)
    loaded.path, loaded.init = ckpt.path, False
    return loaded


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    from distrain import _compat
    from distrain.config import from_dict
    from distrain.shards.manifest import load_manifest
    from distrain.tracking import start_tracker

    _compat.quiet_train_report_log()
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = compute_threads(cfg, float(loop_config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    manifest = load_manifest(cfg.data.shards)
    resumed = _resume_point(cfg)
    make_loader = decode = None
    if cfg.data.engine == "ray_data":  # batches from the run's Ray Datasets (data/ray_data.py), decoded on CPU
        from distrain.data.ray_loader import shard_loaders

        make_loader, decode = shard_loaders(loop_config["ingest"], loop_config.get("control"), rank, world), "cpu"
    w = setup(cfg, manifest, rank=rank, world=world, device=device, checkpoint=resumed, decode=decode,
              make_loader=make_loader)
    poller = None
    if loop_config.get("control") is not None:
        from distrain.train.control import StopPoller, worker_sink

        poller = w.stop_requested = StopPoller(loop_config["control"])
        loop_config["control"].register.remote(f"RayTrainWorker rank {rank}",
                                               ray.get_runtime_context().get_actor_id(), os.getpid())
        console.set_sink(worker_sink(loop_config["control"], rank))  # lines go to the driver, which prints them
    bad_limit = max_bad_shards(cfg, manifest)
    if rank == 0 and resumed is not None:
        say(f"{'starting from another run' if resumed.init else 'resuming'} at epoch {w.start_epoch + 1} from "
            f"{resumed.path}")
    classes, history = w.classes, w.history
    run_dir = storage.run_folder(cfg)
    misclassified_cap = cfg.wandb.max_misclassified if cfg.wandb.mode != "disabled" else 0
    tracker = start_tracker(cfg, rank=rank, run_dir=run_dir)
    status: dict[str, Any] = {"status": "ok"}
    first_step_at = None
    try:
        for epoch in range(w.start_epoch, cfg.train.epochs):
            if w.begin_epoch(epoch) and rank == 0:
                _say_phase(cfg, w, first=epoch == w.start_epoch)
                if cfg.train.phases:  # a mark on W&B's step axis where each phase (re)starts
                    tracker.log({"train/step": w.stepper.global_step, "phase/index": w.phase.index + 1,
                                 "phase/epoch": epoch + 1, "phase/unfreeze_depth": w.model.unfreeze_depth,
                                 "phase/trainable_params": w.model.num_trainable(), "phase/lr": w.stepper.lr()})
            micro_batches = len(w.train_loader)

            def on_log(step, i, loss, ips, lr, epoch=epoch, micro_batches=micro_batches):
                tracker.log_step(step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": ips,
                                        "epoch": epoch + i / micro_batches})
                if rank == 0:
                    console.progress(f"epoch {epoch + 1}/{cfg.train.epochs} step {i + 1}/{micro_batches} "
                                     f"loss {loss:.4f} lr {lr:.2e} {ips:,.0f} img/s")

            run = w.stepper.run_epoch(w.train_loader, epoch, world, log_every=cfg.train.log_every, on_log=on_log)
            first_step_at = first_step_at or run["first_step_at"]
            if run["status"] != "ok":  # nan: stop, naming the step; stopped: the trial or run was stopped
                status = {**run, "reason": poller.why() if poller else None}
                break
            meter, wrong, val_decode_errors = w.validate(misclassified_cap)
            val = meter.compute(classes)
            totals = [all_sum(run[k], device) for k in ("loss_sum", "seen", "decode_errors")]
            skipped = skipped_shards(w)  # every rank's, the same list on all of them
            val_unreadable = int(all_sum(w.val_loader.unreadable, device))
            metrics = {
                "epoch": epoch + 1,
                "phase": w.phase.index + 1,
                "trainable_params": w.model.num_trainable(),
                "train_loss": totals[0] / max(1, totals[1]),
                "lr": w.stepper.lr(),
                "images_per_s": totals[1] / max(1e-9, run["train_time"]),
                "epoch_time_s": run["train_time"],
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "val_count": val["count"],
                "val_per_class_acc": val["per_class_acc"],
                "decode_errors": int(totals[2]) + val_decode_errors,
                "skipped_shards": skipped,
                "val_unreadable": val_unreadable,
                "global_step": w.stepper.global_step,
                "first_step_at": first_step_at,
            }
            if cfg.data.engine == "ray_data":  # where this epoch's training rows were decoded: node id → rows
                metrics["decode_nodes"] = _merged_counts(all_gather(dict(w.train_loader.nodes)))
            history.append(dict(metrics))
            if skipped and rank == 0:
                warn(f"epoch {epoch + 1}: {len(skipped)} shard(s) skipped (unreadable; their samples refilled from "
                     f"the others" + (f", {val_unreadable} validation samples not read" if val_unreadable else "")
                     + "): " + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
            if len(skipped) > bad_limit:
                status = {"status": "bad_shards", "epoch": epoch, "message": (
                    f"epoch {epoch + 1}: {len(skipped)} unreadable shards, more than data.max_bad_shards="
                    f"{bad_limit}: " + "; ".join(skipped))}
                break
            tracker.log_epoch(epoch + 1, metrics, val["confusion"], classes, wrong)
            if rank == 0:
                say(f"epoch {epoch + 1}/{cfg.train.epochs}: train_loss {metrics['train_loss']:.4f} "
                    f"val_loss {val['loss']:.4f} val_top1 {val['top1']:.4f} val_top5 {val['top5']:.4f} "
                    f"({val['count']} val images, {metrics['images_per_s']:,.0f} img/s)")
            position = {**w.train_loader.position(), "epoch": epoch + 1, "seed": w.seed}
            _report(ray.train, metrics, rank, w, cfg, epoch + 1, history, position, val["confusion"])
            if loop_config.get("control") is not None and rank == 0:
                # after the checkpoint is stored: the driver draws curves.png from the history, a Tune trial
                # reports the epoch (with this checkpoint under PBT)
                loop_config["control"].post.remote({
                    "history": [{k: v for k, v in h.items() if k != "val_per_class_acc"} for h in history],
                    "checkpoint": storage.join(run_dir, checkpoint.dir_name(epoch + 1))})
        if poller is not None:
            poller.close()
        # All replicas must hold the same parameters after DDP: check it rather than assume it.
        digests = all_gather(param_digest(w.model))
        status["replicas_in_sync"] = len(set(digests)) == 1
        status["param_digest"] = digests[0]
        status["history"] = history
        best = max(history, key=lambda h: h["val_top1"], default={"val_top1": 0.0, "epoch": 0})
        tracker.finish({"best_val_top1": best["val_top1"], "best_epoch": best["epoch"], "status": status["status"]})
    except BaseException:
        tracker.finish({"status": "failed"})
        raise
    finally:
        console.set_sink(None)
    return status


def max_bad_shards(cfg, manifest) -> int:
    """data.max_bad_shards resolved: -1 = 1% of the train split's shards, at least 1."""
    if cfg.data.max_bad_shards >= 0:
        return cfg.data.max_bad_shards
    n = len(manifest.shard_urls(cfg.data.train_split))
    return max(1, -(-n // 100))


def _merged_counts(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def skipped_shards(w) -> list[str]:
    """'url: error' of every shard any rank gave up this epoch (train and validation), sorted; all ranks agree."""
    mine = {**w.train_loader.bad_shards, **w.val_loader.bad_shards}
    merged: dict[str, str] = {}
    for part in all_gather(mine):
        merged.update(part)
    return [f"{url}: {error}" for url, error in sorted(merged.items())]


def _say_phase(cfg, w, first: bool) -> None:
    """The start block's line (workers, device, model, data) once, and a line at each phase (re)entered."""
    model = w.model
    if first:
        say(f"{w.world} worker(s) on {w.device.type}; {model.info.name} at {model.spec.image_size}px "
            f"({len(w.manifest.classes)} classes), unfreeze_depth={model.unfreeze_depth}/{len(model.stages)}, "
            f"{model.num_trainable():,} trainable parameters; {len(w.train_loader)} batches/epoch/rank")
    if cfg.train.phases:
        p = w.phase
        say(f"phase {p.index + 1}/{len(cfg.train.phases)} (epochs {p.start + 1}-{p.stop}): unfreeze_depth "
            f"{model.unfreeze_depth}/{len(model.stages)}, lr {p.cfg.optim.lr:g}, {model.num_trainable():,} trainable "
            f"parameters")


def _report(train_api, metrics, rank, w, cfg, epoch, history, position, confusion) -> None:
    """All ranks call report (it is a barrier); only rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-") as d:
        ckpt = None
        if rank == 0:
            meta = {"epoch": epoch, "global_step": w.stepper.global_step, "phase": w.phase.index,
                    "classes": w.classes, "history": history, "data_position": position,
                    "frozen_source": {"backbone": cfg.model.backbone, "weights": cfg.model.weights,
                                      "weights_source": w.model.info.weights_source},
                    "metrics": {k: v for k, v in metrics.items() if k != "val_per_class_acc"},
                    "confusion": confusion, "config": cfg.to_dict()}
            checkpoint.write(d, w.model, w.stepper.state_dict(), meta, full=cfg.model.save_frozen)
            ckpt = train_api.Checkpoint.from_directory(d)
        try:
            train_api.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint.dir_name(epoch))
        except OSError as e:  # the storage stopped taking writes: say where, and what is still there
            run_dir = storage.run_folder(cfg)
            last = checkpoint.latest(run_dir)
            raise checkpoint.CheckpointWriteError(
                f"cannot write the epoch {epoch} checkpoint to {run_dir} ({type(e).__name__}: {e}); the last good "
                f"checkpoint is {last or 'none'}: make the storage writable and rerun the same command to resume "
                f"from it") from None
