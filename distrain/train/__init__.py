"""Distributed fine-tuning under Ray Train: `fit(cfg)` on the driver, `train_loop_per_worker` on every rank."""

from distrain.train.run import TrainingError, checkpoint_to_model_dir, fit, preflight

__all__ = ["TrainingError", "checkpoint_to_model_dir", "fit", "preflight"]
