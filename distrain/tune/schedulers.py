"""Tune's trial schedulers for a sweep: ASHA (stopping promptly), FIFO, PBT and PB2 (mutations from tune.space).

Usage (tune/sweep.py):
    scheduler = make_scheduler(cfg, space)     # space: {dotted key: Dist} from tune/space.py

ASHA's rungs are epochs strictly below train.epochs; its stop decisions reach the trial's run directly
(`prompt_stops`). PBT perturbs continuous keys (x0.8 / x1.2 or a resample, p 0.25) and resamples choice/grid keys
every tune.perturbation_interval epochs; the bottom tune.quantile of trials take over a top trial's checkpoint
(tune/trial.py makes that a new Train run from it). PB2 picks the new values with a GP bandit over the continuous
keys' bounds.
"""

from __future__ import annotations

from distrain.config import Config

# Never mutated by PBT: a trial takes over its donor's depth with its checkpoint (the two must agree), and a
# perturbed depth would need a trainable set the checkpoint does not hold.
NOT_MUTATED = ("model.unfreeze_depth",)


def make_scheduler(cfg: Config, space: dict | None = None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    if cfg.tune.scheduler in ("pbt", "pb2"):
        mutations = {k: d.to_mutation() for k, d in (space or {}).items() if k not in NOT_MUTATED}
        common = {"time_attr": "epoch", "perturbation_interval": cfg.tune.perturbation_interval,
                  "quantile_fraction": cfg.tune.quantile, "require_attrs": True, "synch": cfg.tune.synch}
        if cfg.tune.scheduler == "pbt":
            from ray.tune.schedulers import PopulationBasedTraining

            return PopulationBasedTraining(hyperparam_mutations=mutations, resample_probability=0.25, **common)
        from ray.tune.schedulers.pb2 import PB2

        bounds = {k: [float(min(d.extremes())), float(max(d.extremes()))] for k, d in (space or {}).items()
                  if k not in NOT_MUTATED and d.kind in ("loguniform", "uniform", "quniform", "randint")}
        return PB2(hyperparam_bounds=bounds, **common)
    # Rungs sit strictly below the last epoch (max_t just under train.epochs): a "stop" at the last epoch saves
    # nothing and would kill a trial while it writes its model. stop_last_trials=False: trials end on their own.
    return prompt_stops(ASHAScheduler, cfg.tune.name)(
        time_attr="epoch", max_t=cfg.train.epochs - 0.5, grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def prompt_stops(scheduler_cls, sweep: str):
    """`scheduler_cls` that also tells a trial's run to stop the moment it decides so, straight to the run's stop
    flag (train/control.py, read after every step). Tune's own stop goes through the trial actor (its cleanup()
    asks the same flag, then waits); this path does not depend on that actor being free to take the call."""
    from ray.tune.schedulers import TrialScheduler

    from distrain.train.control import stop_named
    from distrain.tune.trial import stop_name

    class PromptStop(scheduler_cls):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                stop_named(stop_name(sweep, trial.trial_id), f"stopped by {scheduler_cls.__name__}")
            return decision

    PromptStop.__name__ = f"Prompt{scheduler_cls.__name__}"
    return PromptStop
