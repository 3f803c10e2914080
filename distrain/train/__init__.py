"""Distributed fine-tuning under Ray Train: `fit(cfg)` on the driver, `train_loop_per_worker` on every rank.

Modules: `preflight` (checks before workers start), `placement` (do the workers fit), `checkpoint` (the checkpoint
format, finding, resuming, converting to model/), `core` (the Ray-free per-worker setup and step loop), `loop` (the
Ray Train worker function over the core), `run` (the driver), `bench` (Ray Train vs torchrun).
"""

from distrain.train.errors import PreflightError, TrainingError
from distrain.train.preflight import preflight
from distrain.train.run import fit, format_summary, run_dir_of

__all__ = ["PreflightError", "TrainingError", "fit", "format_summary", "preflight", "run_dir_of"]
