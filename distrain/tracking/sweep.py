"""The sweep's own W&B run: one run (job_type "sweep", group = the sweep) with the trial table and the best trial.

Usage:
    from distrain.tracking.sweep import log_sweep_summary
    log_sweep_summary(cfg, rows, best, sweep_dir)    # never raises: W&B trouble costs no results
"""

from __future__ import annotations

from distrain.console import warn
from distrain.tracking.charts import _cell, _flatten, trials_table
from distrain.tracking.run import WandbTracker, _first_line, _init, resolve_mode, run_config


def log_sweep_summary(cfg, rows: list[dict], best: dict, sweep_dir: str) -> None:
    """One W&B run (job_type "sweep", group = the sweep, named after it) holding the trial table and the best."""
    if resolve_mode(cfg) == "disabled":
        return
    name = cfg.tune.name
    try:
        run, restore = _init(cfg, run_dir=sweep_dir, config=run_config(cfg, sweep_dir=sweep_dir), name=name,
                             job_type="sweep", group=name)
    except Exception as e:  # W&B trouble must not cost the sweep
        warn(f"W&B could not start for the sweep summary ({type(e).__name__}: {_first_line(e)}); skipped")
        return
    tracker = WandbTracker(run, cfg, restore)
    tracker._guard("sweep summary", _log_sweep, run, rows, best)
    tracker.finish()


def _log_sweep(run, rows, best) -> None:
    run.log({"sweep/trials": trials_table(rows)})
    summary = {"num_trials": len(rows)}
    summary.update({f"best/{k}": _cell(v) for k, v in _flatten(best or {}).items()})
    run.summary.update(summary)
