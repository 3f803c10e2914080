"""Driver side of a training run: preflight checks, the Ray TorchTrainer, and what the run folder holds at the end.

Usage:
    from distrain.config import load_config
    from distrain.train import fit
    summary = fit(load_config("configs/fashion_mnist_cpu.yaml"))   # connects to Ray first if needed
    summary["best_val_top1"], summary["run_dir"]

The run folder is `scaling.storage_path / train.name`. Its name is stable (no timestamp), so running the same config
again resumes from the last checkpoint there; `restart=True` clears it first. Everything that can be checked before
workers start is checked here (shards, world size, class count against an existing checkpoint, writable storage,
node-local storage on a multi-node cluster, resources), because a failure after the ~30 s worker start-up, or a
hang at a collective, is the expensive kind.

At the end the run folder holds:
    config.yaml              the resolved config
    checkpoint_epoch_NNNN/   the best `train.keep_checkpoints` checkpoints by val top-1 (Ray Train's own layout)
    model/                   the best epoch's model, self-contained (distrain/modeldir.py)
    summary.json             best_val_top1, best_epoch, epochs, best_checkpoint, images_per_s, run_dir, history
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from distrain.config import Config, to_yaml


class TrainingError(RuntimeError):
    """A run that cannot start or did not finish, with the reason and what to do."""


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_root(cfg: Config) -> str:
    """storage_path as Ray wants it: absolute for local paths, URLs as they are."""
    path = cfg.scaling.storage_path
    if path.startswith("file://"):
        path = path[len("file://"):]
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute: Train workers (and Tune trial drivers) run in other working directories."""
    updates: dict[str, Any] = {"scaling.storage_path": storage_root(cfg)}
    if not is_remote(cfg.data.shards):
        updates["data.shards"] = os.path.abspath(os.path.expanduser(cfg.data.shards))
    weights = cfg.model.weights
    if not is_remote(weights) and os.path.exists(os.path.expanduser(weights)):
        updates["model.weights"] = os.path.abspath(os.path.expanduser(weights))
    if cfg.wandb.dir and not is_remote(cfg.wandb.dir):
        updates["wandb.dir"] = os.path.abspath(os.path.expanduser(cfg.wandb.dir))
    return cfg.replace(updates)


def run_dir_of(cfg: Config, name: str | None = None) -> str:
    return storage_root(cfg).rstrip("/") + "/" + (name or cfg.train.name)


def latest_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray recorded in a run folder (what a rerun resumes from), or None."""
    fs, path = _fs(run_dir)
    snapshot = f"{path}/checkpoint_manager_snapshot.json"
    if not fs.exists(snapshot):
        return None
    data = json.loads(fs.cat_file(snapshot))
    latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return f"{run_dir}/{latest}" if latest else None


def resolve_gpu(cfg: Config, cluster: dict) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return cluster.get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def cpus_per_worker(cfg: Config) -> int:
    return cfg.scaling.cpus_per_worker or cfg.data.loader_workers + 1


def preflight(cfg: Config, cluster: dict | None = None, run_dir: str | None = None,
              restart: bool = False) -> dict[str, Any]:
    """Every check that can fail before workers start. Returns the facts the run needs."""
    from distrain.shards.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(cfg.data.shards)
        train_shards = manifest.shard_urls(cfg.data.train_split)
        manifest.split(cfg.data.val_split)
    except ManifestError as e:
        raise TrainingError(f"data.shards: {e}") from None
    _check_shards_exist(manifest, [cfg.data.train_split, cfg.data.val_split])
    world = cfg.scaling.num_workers
    try:
        from distrain.data import check_shards
    except ImportError:  # pragma: no cover - the data package always provides it
        check_shards = None
    if check_shards is not None:
        try:
            check_shards(manifest, cfg.data.train_split, world_size=world, loader_workers=cfg.data.loader_workers,
                         batch_size=cfg.data.batch_size, limit=cfg.data.train_limit)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    elif len(train_shards) < world:
        raise TrainingError(f"{cfg.data.shards}: split '{cfg.data.train_split}' has {len(train_shards)} shard(s) "
                            f"but scaling.num_workers={world}: rebuild with a smaller --shard-size so there are "
                            f"at least {world}")

    run_dir = run_dir or run_dir_of(cfg)
    if not restart:
        ckpt = latest_checkpoint(run_dir)
        if ckpt:
            fs, path = _fs(ckpt)
            meta_path = f"{path}/meta.json"
            if fs.exists(meta_path):
                meta = json.loads(fs.cat_file(meta_path))
                if meta.get("classes") != manifest.classes:
                    raise TrainingError(
                        f"{ckpt} was trained on {len(meta.get('classes', []))} classes but {cfg.data.shards} has "
                        f"{manifest.num_classes}: use --restart to start over, or another train.name")
                if meta.get("model", {}).get("backbone") != cfg.model.backbone:
                    raise TrainingError(f"{ckpt} holds a {meta['model']['backbone']} model, the config asks for "
                                        f"{cfg.model.backbone}: use --restart or another train.name")
    _check_writable(run_dir)

    cluster = cluster or {}
    root = storage_root(cfg)
    if cluster.get("nodes", 1) > 1 and not is_remote(root) and not shared_mount(root):
        raise TrainingError(
            f"scaling.storage_path={cfg.scaling.storage_path!r} is on a node-local filesystem "
            f"({mount_of(root)[1]} at {mount_of(root)[0]}) but the cluster has {cluster['nodes']} nodes: "
            f"checkpoints written on one node are invisible to the others, so the run could neither resume nor "
            f"recover from a failure. Use s3://, gs:// or a path on a shared mount (NFS, Lustre, a FUSE bucket).")
    use_gpu = resolve_gpu(cfg, cluster)
    cpus = cpus_per_worker(cfg)
    if cluster and not os.environ.get("RAY_ADDRESS"):
        # A local cluster cannot grow: an unplaceable worker group would wait and retry forever.
        need_cpu = world * cpus
        if need_cpu > cluster.get("CPU", 0) + 1e-9:
            raise TrainingError(f"{world} workers × {cpus} CPUs = {need_cpu} CPUs, but this cluster has "
                                f"{cluster.get('CPU', 0):g}: lower scaling.num_workers or data.loader_workers, or "
                                f"set scaling.cpus_per_worker")
        if use_gpu and world * cfg.scaling.gpus_per_worker > cluster.get("GPU", 0) + 1e-9:
            raise TrainingError(f"{world} workers × {cfg.scaling.gpus_per_worker} GPUs, but this cluster has "
                                f"{cluster.get('GPU', 0):g}")
    return {"manifest": manifest, "use_gpu": use_gpu, "cpus_per_worker": cpus, "run_dir": run_dir}


SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse",
                   "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "9p", "wekafs", "efs")


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding `path`, from /proc/mounts."""
    best = ("/", "unknown")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt, fstype = parts[1].replace("\\040", " "), parts[2]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best


# The user's word that paths under these folders (os.pathsep-separated) are the same storage on every node, for
# what /proc/mounts cannot tell: a bind mount of shared storage, a filesystem type not listed above, or several
# Ray nodes on one machine. Set it where the checks run: the submitting shell and the job (`--env`).
SHARED_STORAGE_ENV = "DISTRAIN_SHARED_STORAGE"


def declared_shared(path: str) -> bool:
    real = os.path.realpath(path)
    for prefix in filter(None, os.environ.get(SHARED_STORAGE_ENV, "").split(os.pathsep)):
        root = os.path.realpath(prefix)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def shared_mount(path: str) -> bool:
    """Whether a local path lives on a filesystem that other nodes can see too."""
    if declared_shared(path):
        return True
    fstype = mount_of(path)[1]
    return fstype in SHARED_FS_TYPES or fstype.startswith("fuse.") or fstype.startswith("nfs")


def _check_shards_exist(manifest, splits: list[str]) -> None:
    for split in splits:
        urls = manifest.shard_urls(split)
        if not urls:
            raise TrainingError(f"{manifest.location}: split '{split}' has no shards")
        for url in (urls[0], urls[-1]):  # cheap: first and last; the loader checks all at start
            fs, path = _fs(url)
            if not fs.exists(path):
                raise TrainingError(f"shard {url} named by {manifest.location}/manifest.json does not exist")


def _check_writable(run_dir: str) -> None:
    try:
        fs, path = _fs(run_dir)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.distrain_write_probe"
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)
    except Exception as e:
        raise TrainingError(f"scaling.storage_path: cannot write to {run_dir} ({type(e).__name__}: {e})") from None


def fit(cfg: Config, *, restart: bool = False, callbacks: list | None = None, job_type: str = "train",
        group: str | None = None, run_name: str | None = None, storage_path: str | None = None,
        write_outputs: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run to completion; returns the summary (also written to summary.json)."""
    from distrain import runtime

    t_start, wall_start = time.perf_counter(), time.time()
    if storage_path:
        cfg = cfg.replace({"scaling.storage_path": storage_path})
    cfg = absolute_paths(cfg)
    name = run_name or cfg.train.name
    run_dir = run_dir_of(cfg, name)
    if not runtime_is_connected():
        runtime.connect()
    cluster = runtime.cluster_summary()
    if restart:
        _remove_run(run_dir)
    else:
        done = finished_summary(run_dir, cfg)
        if done is not None:
            print(f"[distrain] {name} already finished its {cfg.train.epochs} epochs in {run_dir}; "
                  f"use --restart to train again", flush=True)
            return done
    facts = preflight(cfg, cluster, run_dir=run_dir, restart=restart)

    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distrain.train.loop import train_loop_per_worker

    fs, path = _fs(run_dir)
    with fs.open(f"{path}/config.yaml", "w") as f:
        f.write(to_yaml(cfg))
    resources = {"CPU": facts["cpus_per_worker"]}
    if facts["use_gpu"]:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "cpus_per_worker": facts["cpus_per_worker"],
                           "run_name": name, "job_type": job_type, "group": group, "run_dir": run_dir},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=facts["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_root(cfg),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=cfg.scaling.start_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or None,
            # Fault drills and distrain's own switches reach the workers; secrets stay out of runtime envs.
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("DISTRAIN_")}}),
    )
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training run {name} failed (run folder {run_dir}; rerun the same command to resume "
                            f"from its last checkpoint):\n{e}") from None
    finally:
        # fit() installs a Ctrl-C handler that holds the controller actor; put ours back so the finished
        # controller is released (and a later Ctrl-C does not go to a run that is over).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)
    if result.error is not None:
        raise TrainingError(f"training run {name} failed: {result.error}") from result.error
    status = result.return_value or {}
    best = max(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_top1", -1), default=None)
    if status.get("status") == "nan":
        last = latest_checkpoint(run_dir)
        raise TrainingError(f"{status['message']}; stopped. Last good checkpoint: {last or 'none'} (lower "
                            f"optim.lr, enable optim.grad_clip, or check the data)")
    history = status.get("history") or []
    if best is None or not history:
        raise TrainingError(f"training run {name} reported no epochs")
    best_ckpt, best_metrics = best
    epochs_run = [h for h in history]
    summary = {
        "best_val_top1": best_metrics["val_top1"],
        "best_epoch": best_metrics["epoch"],
        "epochs": history[-1]["epoch"],
        "best_checkpoint": best_ckpt.path if not is_remote(run_dir) else _url_of(run_dir, best_ckpt.path),
        "images_per_s": sum(h["images_per_s"] for h in epochs_run) / len(epochs_run),
        "run_dir": run_dir,
        "model_dir": f"{run_dir}/model",
        "final_val_top1": history[-1]["val_top1"],
        "replicas_in_sync": status.get("replicas_in_sync"),
        "decode_errors": sum(h.get("decode_errors", 0) for h in history),
        "wall_s": round(time.perf_counter() - t_start, 1),
        # From this call's start to this call's first optimizer step (start-up cost: Ray, workers, model, data).
        "first_step_s": (round(history[-1]["first_step_at"] - wall_start, 1)
                         if history[-1].get("first_step_at") else None),
        "history": [{k: v for k, v in h.items() if k != "val_per_class_acc"} for h in history],
    }
    if write_outputs:
        checkpoint_to_model_dir(summary["best_checkpoint"], summary["model_dir"], provenance={
            "run": name, "run_dir": run_dir, "epoch": summary["best_epoch"], "val_top1": summary["best_val_top1"]})
        from distrain.tracking import log_model_artifact, sync_hint

        log_model_artifact(cfg, name, summary["model_dir"], run_dir=run_dir, job_type=job_type, group=group)
        hint = sync_hint(cfg, run_dir)
        if hint:
            summary["wandb_sync"] = hint
        with fs.open(f"{path}/summary.json", "w") as f:
            f.write(json.dumps(summary, indent=2))
    return summary


def finished_summary(run_dir: str, cfg: Config) -> dict | None:
    """The summary of a run folder that already holds a finished run of this config, else None."""
    fs, path = _fs(run_dir)
    try:
        summary = json.loads(fs.cat_file(f"{path}/summary.json"))
        saved = fs.cat_file(f"{path}/config.yaml").decode()
    except (FileNotFoundError, OSError, ValueError):
        return None
    if saved != to_yaml(cfg) or summary.get("epochs", 0) < cfg.train.epochs:
        return None
    return summary


def _url_of(run_dir: str, fs_path: str) -> str:
    scheme = run_dir.split("://", 1)[0]
    return f"{scheme}://{fs_path}" if "://" not in fs_path else fs_path


def runtime_is_connected() -> bool:
    import ray

    return ray.is_initialized()


def _remove_run(run_dir: str) -> None:
    fs, path = _fs(run_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def checkpoint_to_model_dir(checkpoint: str, out_dir: str, provenance: dict | None = None) -> str:
    """Rebuild the full model of a checkpoint (frozen part from its source) and write a model/ folder."""
    import tempfile

    import torch

    from distrain.modeldir import save_model_dir
    from distrain.models import create_model

    fs, path = _fs(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(f"{path}/meta.json", f"{tmp}/meta.json")
        fs.get(f"{path}/weights.pt", f"{tmp}/weights.pt")
        meta = json.loads(Path(tmp, "meta.json").read_text())
        weights = torch.load(f"{tmp}/weights.pt", map_location="cpu", weights_only=True)
    m = meta["model"]
    source = meta["frozen_source"]
    model = create_model(m["backbone"], m["num_classes"], weights="none" if meta["frozen_included"] else
                         source["weights"], unfreeze_depth=m["unfreeze_depth"], dropout=m["dropout"],
                         head_hidden=m["head_hidden"])
    if meta["frozen_included"]:
        model.load_state_dict(weights)
    else:
        model.load_trainable_state_dict(weights)
    return save_model_dir(model, out_dir, classes=meta["classes"], model_cfg=m, image_size=m["image_size"],
                          provenance=provenance)


def format_summary(summary: dict) -> str:
    lines = [f"run folder     {summary['run_dir']}",
             f"best val top-1 {summary['best_val_top1']:.4f} (epoch {summary['best_epoch']} of {summary['epochs']})",
             f"throughput     {summary['images_per_s']:,.0f} images/s",
             f"model          {summary['model_dir']}"]
    if summary.get("wandb_sync"):
        lines.append(summary["wandb_sync"])
    return "\n".join(lines)


