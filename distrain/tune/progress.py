"""A sweep's console: one line per trial as it starts, reports an epoch and ends, instead of Tune's boxed tables.

Usage (tune/sweep.py):
    tune.RunConfig(..., verbose=0, callbacks=[TrialLines(epochs=cfg.train.epochs, scheduler="asha")])

    [distrain] trial_3f2a1_00001 starts: optim.lr=0.0003, model.unfreeze_depth=2
    [distrain] trial_3f2a1_00001 epoch 1/3: val top-1 0.8123 (12.4 s)
    [distrain] trial_3f2a1_00001 stopped early by ASHA at epoch 1: val top-1 0.8123
    [distrain] trial_3f2a1_00002 failed: loss/gradients became non-finite at epoch 1, step 5 (loss inf)

A Tune callback runs in the sweep's driver, so these lines come from one process, in order, with no worker prefix.
The sweep's table (trial, parameters, epochs, val top-1, status) is printed once at the end (Sweep.format()).
"""

from __future__ import annotations

import time

from ray import tune

from distrain.console import say


def _params(config: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items()))


class TrialLines(tune.Callback):
    def __init__(self, epochs: int, scheduler: str, metric: str = "val_top1"):
        self.epochs, self.scheduler, self.metric = epochs, scheduler, metric
        self._started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.monotonic()
        say(f"{trial} starts: {_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        took = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
        say(f"{trial} epoch {result.get('epoch', '?')}/{self.epochs}: val top-1 {shown} ({took:.1f} s)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epoch = int(last.get("epoch") or 0)
        value = last.get(self.metric)
        shown = f": val top-1 {value:.4f}" if isinstance(value, (int, float)) else ""
        if epoch and epoch < self.epochs:
            by = "ASHA" if self.scheduler == "asha" else self.scheduler.upper()
            say(f"{trial} stopped early by {by} at epoch {epoch}{shown}")
        else:
            say(f"{trial} completed {epoch or self.epochs} epoch(s){shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        from distrain.tune.results import error_text

        raw = getattr(trial, "error_msg", None) or ""
        message = error_text(RuntimeError(raw)) if raw else "see its error file"
        say(f"{trial} failed: {message}")
