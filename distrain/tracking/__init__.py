"""Experiment tracking with Weights & Biases: one W&B run per training run or Tune trial, logged from rank 0.

Usage:
    from distrain.tracking import start_tracker, sync_hint, log_model_artifact, log_sweep_summary
    tracker = start_tracker(cfg, rank=rank, run_dir=run_dir)    # workers; a no-op tracker on ranks > 0
    log_model_artifact(cfg, model_dir, run_dir=run_dir)          # driver: model/ as an artifact (wandb.log_model)
    log_sweep_summary(cfg, rows, best, sweep_dir)                # driver: the sweep's own run with the trial table
    sync_hint(cfg, run_dir)                                      # offline: where the runs are, `wandb sync ...`

Modules: `run` (starting W&B with its conventions, the tracker), `charts` (confusion chart, tables), `artifacts`
(the model artifact), `sweep` (the sweep summary run).
"""

from distrain.tracking.artifacts import log_model_artifact
from distrain.tracking.run import (
    WANDB_ENV,
    Tracker,
    WandbTracker,
    offline_runs,
    resolve_mode,
    run_config,
    run_id,
    start_tracker,
    sync_command,
    sync_hint,
    wandb_dir,
)
from distrain.tracking.sweep import log_sweep_summary

__all__ = ["WANDB_ENV", "Tracker", "WandbTracker", "log_model_artifact", "log_sweep_summary", "offline_runs",
           "resolve_mode", "run_config", "run_id", "start_tracker", "sync_command", "sync_hint", "wandb_dir"]
