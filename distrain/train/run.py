"""Driver side of a training run: preflight, the Ray TorchTrainer, and what the run folder holds at the end.

Usage:
    from distrain.config import load_config
    from distrain.train import fit
    summary = fit(load_config("configs/fashion_mnist_cpu.yaml"))   # connects to Ray first if needed
    summary["best_val_top1"], summary["run_dir"]

A run is its config: the run folder is `scaling.storage_path / train.name`, W&B's job type and group are
`train.job_type` and `train.group`. The name is stable (no timestamp), so running the same config again resumes from
the last checkpoint there; `restart=True` deletes the folder first, but only a folder distrain created (its marker),
only after every check passed, and only while no other run holds it (`.distrain.lock`).

At the end the run folder holds:
    .distrain.json           distrain made this folder (what --restart checks before deleting anything)
    config.yaml              the resolved config (credentials redacted)
    checkpoint_epoch_NNNN/   the best `train.keep_checkpoints` checkpoints by val top-1 (Ray Train's own layout)
    model/                   the best epoch's model, self-contained (distrain/models/folder.py)
    summary.json             best_val_top1, best_epoch, epochs, best_checkpoint, images_per_s, run_dir, history
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from distrain import storage
from distrain.config import Config, to_yaml
from distrain.console import say
from distrain.redact import redact_text
from distrain.train import checkpoint
from distrain.train.errors import TrainingError
from distrain.train.preflight import PreflightError, check_cluster, check_local, looks_like_run

absolute_paths = storage.absolute_paths
run_dir_of = storage.run_folder


def fit(cfg: Config, *, restart: bool = False, callbacks: list | None = None, handle=None) -> dict[str, Any]:
    """Run (or resume) the training run `cfg` describes to completion; returns the summary (also summary.json).

    callbacks: Ray Train callbacks that observe the run (a Tune trial's reporting); they change nothing in it.
    handle: a control.RunHandle to stop or abort the run from elsewhere (a Tune trial's cleanup); fit() makes its
    own otherwise. In the main thread, the first Ctrl-C stops the run after the current step (checkpoints kept,
    W&B finished as `stopped`; the same command resumes it), a second one aborts it."""
    from distrain import runtime

    t_start, wall_start = time.perf_counter(), time.time()
    cfg = absolute_paths(cfg)
    name, run_dir = cfg.train.name, run_dir_of(cfg)
    try:
        facts = check_local(cfg, run_dir, restart=restart)
    except PreflightError as e:
        raise TrainingError(str(e)) from None
    if storage.is_empty(run_dir) or looks_like_run(run_dir):
        storage.mark(run_dir, "run", name=name)  # a new folder, or one of an earlier distrain: ours from now on
    lock = storage.RunLock(run_dir, "training run", log=say)
    try:
        lock.acquire()
    except storage.StorageError as e:
        raise TrainingError(str(e)) from None
    try:
        if not restart:
            done = finished_summary(run_dir, cfg)
            if done is not None:
                say(f"{name} already finished its {cfg.train.epochs} epochs in {run_dir}; use --restart to train "
                    f"again")
                return done
        if not runtime.connected():
            runtime.connect()
        cluster = runtime.cluster_summary()
        try:
            facts = check_cluster(cfg, cluster, facts)
        except PreflightError as e:
            raise TrainingError(str(e)) from None
        if restart:
            _remove_run(run_dir, lock)
        storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))
        from distrain.train.control import RunHandle

        own = handle is None
        handle = handle or RunHandle()
        try:
            result = _run_trainer(cfg, facts, callbacks, handle)
        finally:
            if own:  # a caller's handle is the caller's to end (a Tune trial reads its events after fit returns)
                handle.close()
        return _finish(cfg, run_dir, result, t_start, wall_start)
    finally:
        lock.release()


def _remove_run(run_dir: str, lock: storage.RunLock) -> None:
    """--restart: the run folder goes (distrain's own only: its marker says so), then it is marked and locked anew."""
    try:
        storage.remove_owned(run_dir, "run", " (--restart deletes only run folders distrain made)")
    except storage.StorageError as e:
        raise TrainingError(str(e)) from None
    storage.mark(run_dir, "run", name=lock.folder.rstrip("/").rsplit("/", 1)[-1])
    lock.rewrite()


def _run_trainer(cfg: Config, facts: dict[str, Any], callbacks: list | None, handle):
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distrain.train.loop import train_loop_per_worker

    name, run_dir = cfg.train.name, facts["run_dir"]
    loop_config = {"config": cfg.to_dict(), "cpus_per_worker": facts["resources"]["CPU"], "control": handle.control}
    data: dict[str, Any] = {}
    if cfg.data.engine == "ray_data":
        loop_config["ingest"], data = ray_data_ingest(cfg, facts, handle.control)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=facts["use_gpu"],
                                     resources_per_worker=facts["resources"],
                                     label_selector=data.pop("label_selector", None)),
        **data,
        # Every collective is bounded: a rank stuck in a read or lost with its node ends the attempt (and Ray
        # Train's failure handling restarts it from the last checkpoint) instead of freezing every GPU.
        torch_config=TorchConfig(timeout_s=int(cfg.scaling.collective_timeout_s)),
        run_config=RunConfig(
            name=name, storage_path=storage.absolute(cfg.scaling.storage_path),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=cfg.scaling.start_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            callbacks=[*(callbacks or []), *handle.callbacks] or None,
            worker_runtime_env={"env_vars": worker_env()}),
    )
    from distrain.train.control import EventPrinter

    # the workers' lines, printed here (console.set_sink in each worker), and curves.png drawn at every epoch
    printer = EventPrinter(handle.control, curves=storage.join(run_dir, "curves.png"))
    log = None
    try:
        if threading.current_thread() is threading.main_thread():
            return _fit_interruptible(trainer, handle)
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        log = save_ray_log(run_dir, handle.control)
        last = checkpoint.latest(run_dir)
        rerun = (f"rerun the same command to resume from its last checkpoint, {last}" if last else
                 "Ray Train recorded no checkpoint: rerun the same command to start over")
        where = f"; Ray's output of the run: {log}" if log else ""
        verb = "aborted" if handle.stopping == "aborted" else "failed"
        detail = "" if verb == "aborted" else f":\n{redact_text(str(e))}"
        raise TrainingError(f"training run {name} {verb} (run folder {run_dir}; {rerun}{where}){detail}") from None
    finally:
        printer.close()
        if log is None:
            save_ray_log(run_dir, handle.control, only_if_quiet=True)


def ray_data_ingest(cfg: Config, facts: dict[str, Any], clock) -> tuple[dict, dict]:
    """data.engine=ray_data: the workers' IngestParams and the trainer's datasets, DataConfig and (with a data node
    label) the label selector that keeps the Train workers off the data nodes."""
    from distrain.data import ray_data
    from distrain.data.sources import resolve_source
    from distrain.train.core import phase_of

    spec, manifest = facts["spec"], facts["manifest"]
    size, crop = spec.image_size, spec.preprocess["crop_pct"]
    strengths = [phase_of(cfg, e).cfg.data.aug_strength for e in range(cfg.train.epochs)]
    ingest = {"train": ray_data.params_from_config(cfg, train=True, image_size=size, crop_pct=crop,
                                                   strengths=strengths),
              "val": ray_data.params_from_config(cfg, train=False, image_size=size, crop_pct=crop, strengths=[0.0])}
    splits = {"train": resolve_source(manifest, cfg.data.train_split, check=False),
              "val": resolve_source(manifest, cfg.data.val_split, check=False)}
    ingest["num_samples"] = {k: ray_data.split_size(shards, ingest[k].limit) for k, shards in splits.items()}
    datasets = {k: ray_data.build_dataset(shards, ingest[k], clock) for k, shards in splits.items()}
    data: dict[str, Any] = {"datasets": datasets, "dataset_config": ray_data.ingest_config()}
    if cfg.data.ray_data.node_label:
        key, value = ray_data.parse_label(cfg.data.ray_data.node_label)
        data["label_selector"] = {key: f"!{value}"}
    return ingest, data


def save_ray_log(run_dir: str, control, only_if_quiet: bool = False) -> str | None:
    """Ray's own output of this run (its Train controller and workers: stdout and stderr), into run_dir/ray.log;
    with the quiet console that is where it goes instead of the terminal. Returns the file, or None."""
    from distrain import runtime

    if only_if_quiet and not runtime.quiet_console():
        return None
    try:
        import ray
        from ray.util.state import get_log

        from distrain.train.control import CALL_TIMEOUT_S

        # the address named: with several Ray instances on one machine, the state API cannot guess which
        address = ray.get_runtime_context().gcs_address
        parts = []
        for role, actor_id, pid in ray.get(control.processes.remote(), timeout=CALL_TIMEOUT_S):
            for suffix in ("out", "err"):
                try:
                    text = "".join(get_log(address=address, actor_id=actor_id, suffix=suffix, tail=5000,
                                           timeout=15))
                except Exception as e:  # its node is gone: say so in the file
                    text = f"(not available: {type(e).__name__}: {e})\n"
                if text.strip():
                    parts.append(f"===== {role}, pid {pid}, std{suffix} =====\n{text}")
        url = storage.join(run_dir, "ray.log")
        storage.write_text(url, redact_text("\n".join(parts)))
        return url
    except Exception:  # the log is a convenience: never a reason for a run to fail
        return None


def _fit_interruptible(trainer, handle):
    """trainer.fit() in a thread, so Ctrl-C reaches this one: the first stops the run after the current step,
    the second aborts it. (In the main thread, Ray Train would install its own handler, which aborts at once.)"""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="distrain-fit", daemon=True)
    thread.start()
    interrupts = 0
    while thread.is_alive():
        try:
            thread.join(0.5)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                say("Ctrl-C: stopping after the current step; checkpoints are kept and the same command resumes "
                    "(Ctrl-C again to abort now)")
                handle.stop("Ctrl-C")
            else:
                say("Ctrl-C again: aborting the run")
                handle.abort(timeout_s=30)
                handle.stopping = "aborted"
    if "error" in box:
        raise box["error"]
    return box["result"]


def worker_env() -> dict[str, str]:
    """What reaches the Train workers from this process's environment: distrain's own switches and W&B's settings
    (WANDB_DIR, WANDB_PROJECT, ...: the worker starts the W&B run). Secrets stay out of runtime envs (a job's
    environment provides them)."""
    from distrain.tracking import WANDB_ENV

    return {k: v for k, v in os.environ.items() if k.startswith("DISTRAIN_") or k in WANDB_ENV}


def _finish(cfg: Config, run_dir: str, result, t_start: float, wall_start: float) -> dict[str, Any]:
    """The summary of a finished fit(): model/, summary.json, the W&B model artifact."""
    name = cfg.train.name
    if result.error is not None:
        raise TrainingError(f"training run {name} failed: {redact_text(str(result.error))}") from result.error
    status = result.return_value or {}
    if status.get("status") == "nan":
        last = checkpoint.latest(run_dir)
        raise TrainingError(f"{status['message']}; stopped. Last good checkpoint: {last or 'none'} (lower "
                            f"optim.lr, enable optim.grad_clip, or check the data)")
    if status.get("status") == "bad_shards":
        last = checkpoint.latest(run_dir)
        raise TrainingError(f"{status['message']}; stopped. Last good checkpoint: {last or 'none'}")
    history = status.get("history") or []
    best = checkpoint.best(run_dir)
    if status.get("status") == "stopped" and not history:
        raise TrainingError(f"training run {name} stopped ({status.get('reason', 'requested')}) in epoch "
                            f"{status.get('epoch', 0) + 1} before its first checkpoint: nothing kept")
    if best is None or not history:
        raise TrainingError(f"training run {name} reported no epochs")
    best_ckpt, best_metrics = best
    summary = {
        "best_val_top1": best_metrics["val_top1"],
        "best_epoch": best_metrics["epoch"],
        "epochs": history[-1]["epoch"],
        "status": status.get("status", "ok"),
        "stop_reason": status.get("reason"),
        "best_checkpoint": best_ckpt,
        "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
        "run_dir": run_dir,
        "model_dir": storage.join(run_dir, "model"),
        "final_val_top1": history[-1]["val_top1"],
        "replicas_in_sync": status.get("replicas_in_sync"),
        "decode_errors": sum(h.get("decode_errors", 0) for h in history),
        # every shard given up in any epoch, with its error (the epochs' own lists are in history)
        "skipped_shards": sorted({s for h in history for s in h.get("skipped_shards", [])}),
        "wall_s": round(time.perf_counter() - t_start, 1),
        # From this call's start to this call's first optimizer step (start-up cost: Ray, workers, model, data).
        "first_step_s": (round(history[-1]["first_step_at"] - wall_start, 1)
                         if history[-1].get("first_step_at") else None),
        "history": [{k: v for k, v in h.items() if k != "val_per_class_acc"} for h in history],
    }
    checkpoint.to_model_dir(best_ckpt, summary["model_dir"], provenance={
        "run": name, "run_dir": run_dir, "epoch": summary["best_epoch"], "val_top1": summary["best_val_top1"]})
    from distrain.tracking import log_model_artifact, sync_hint

    log_model_artifact(cfg, summary["model_dir"], run_dir=run_dir)
    hint = sync_hint(cfg, run_dir)
    if hint:
        summary["wandb_sync"] = hint
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    return summary


def finished_summary(run_dir: str, cfg: Config) -> dict | None:
    """The summary of a run folder that already holds a finished run of this config, else None."""
    try:
        summary = storage.read_json(storage.join(run_dir, "summary.json"))
        saved = storage.read_text(storage.join(run_dir, "config.yaml"))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if saved != redact_text(to_yaml(cfg)) or summary.get("epochs", 0) < cfg.train.epochs:
        return None
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"run folder     {summary['run_dir']}",
             f"best val top-1 {summary['best_val_top1']:.4f} (epoch {summary['best_epoch']} of {summary['epochs']})",
             f"throughput     {summary['images_per_s']:,.0f} images/s",
             f"model          {summary['model_dir']}"]
    if summary.get("wandb_sync"):
        lines.append(summary["wandb_sync"])
    return "\n".join(lines)
