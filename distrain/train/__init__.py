"""Distributed fine-tuning under Ray Train: `fit(cfg)` on the driver, `train_loop_per_worker` on every rank."""

from distrain.train.run import TrainingError, export_model, fit, preflight

__all__ = ["TrainingError", "export_model", "fit", "preflight"]
