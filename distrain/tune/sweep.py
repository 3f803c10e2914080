"""Hyperparameter sweeps with Ray Tune, each trial a full multi-worker Ray Train run.

Usage:
    from distrain.config import load_config
    from distrain.tune import run_sweep
    sweep = run_sweep(load_config("configs/tune_fashion_mnist_cpu.yaml"))   # connects to Ray first if needed
    sweep.summary["best_val_top1"], sweep.summary["best_config"], sweep.table

How it fits together. A trial (distrain/tune/trial.py) applies its sampled values to the base config and calls
`distrain.train.fit()`, whose rank 0 posts each epoch to the trial, which reports it to Tune (tune/trial.py).
So one Tune iteration is one epoch, and the ASHA rungs are epochs (`time_attr` is the reported
`epoch`, which stays right when a resumed trial continues from its Train checkpoint).

Resources. Tune only schedules the trial driver; the Train controller then asks for its own placement group of
`scaling.num_workers` workers. The trial driver waits on the controller and does no compute, so it reserves no CPU:
on a 2-CPU machine a trial of 2 one-CPU workers fits, where a 1-CPU driver would leave the workers waiting forever
for the second CPU. Since Tune cannot see the workers' needs,
`max_concurrent_trials` is what keeps trials from starving each other: by default it is the number of trials whose
workers fit into the cluster's CPUs (and GPUs) at once.

Folders. `<scaling.storage_path>/<tune.name>/` is the sweep: Tune's experiment state and one folder per trial, plus
`runs/<trial>/` (each trial's Ray Train run folder: checkpoints, model/, summary.json), `attempts/<trial>/` (one
record per start of a trial), and at the end `trials.csv`, `best.yaml`, `best_model/` and `summary.json`. The folder
carries distrain's marker (`.distrain.json`) and, while a sweep runs, its lock (`.distrain.lock`).

Resume. The sweep name is stable: running the same command again restores the sweep (`Tuner.restore`): finished
trials keep their results and are not run again, interrupted ones continue from their last Train checkpoint, failed
ones stay failed unless `retry_failed`. `restart=True` deletes the sweep folder first (only a folder distrain
made, only after every check passed). A config that differs from the one the sweep was started with (other than W&B
settings) is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import yaml

from distrain import _compat, storage
from distrain.config import Config, ConfigError, from_dict, to_yaml
from distrain.console import say, warn
from distrain.train import placement
from distrain.train.preflight import PreflightError, check_cluster
from distrain.train.run import absolute_paths
from distrain.tune.results import best_trial, collect_trials, format_table, rows, write_outputs
from distrain.tune.schedulers import NOT_MUTATED, make_scheduler
from distrain.tune.space import Dist, num_grid_points, parse_space
from distrain.tune.trial import trial_trainable

SWEEP_CONFIG = "sweep_config.yaml"
# Keys that may differ between the first run of a sweep and its resumption (everything else is the sweep's
# definition; Tune restores its searcher, scheduler and concurrency from the sweep folder).
RESUME_FREE_PREFIXES = ("wandb.",)


class SweepError(RuntimeError):
    """A sweep that cannot start or resume, with the reason and what to do."""


class SweepInterrupted(SweepError):
    """Tune stopped before every trial finished (Ctrl-C, SIGTERM): the state is saved, rerun to resume."""


@dataclass
class Sweep:
    """What run_sweep returns: the figures (also in summary.json) and the trial table (also trials.csv)."""

    summary: dict[str, Any]
    table: list[dict[str, Any]]

    def format(self) -> str:
        return format_table(self.table)


sweep_dir_of = storage.sweep_folder


def trial_name(trial) -> str:
    """Tune's trial name and folder name: stable across a resume, since trial ids are restored with the sweep."""
    return f"trial_{trial.trial_id}"


# ------------------------------------------------------------------------------------------------ planning


def check_plan(cfg: Config, space: dict[str, Dist]) -> None:
    """Scheduler and searcher settings that cannot work, caught before Ray starts."""
    t = cfg.tune
    if t.scheduler == "asha":
        if "train.epochs" in space:
            raise SweepError("tune.space.train.epochs: ASHA's rungs are epochs of a fixed budget (train.epochs); "
                             "search train.epochs with tune.scheduler=fifo")
        if t.grace_period >= cfg.train.epochs:
            raise SweepError(f"tune.grace_period={t.grace_period} is not below train.epochs={cfg.train.epochs}: "
                             f"ASHA could never stop a trial early; lower tune.grace_period, raise train.epochs, "
                             f"or use tune.scheduler=fifo")
    if t.scheduler in ("pbt", "pb2"):
        if "train.epochs" in space or any(k.startswith("train.phases.") for k in space):
            raise SweepError("tune.space: PBT changes values during a trial; train.epochs and train.phases.* are "
                             "fixed for it (search them with asha or fifo)")
        if t.perturbation_interval >= cfg.train.epochs:
            raise SweepError(f"tune.perturbation_interval={t.perturbation_interval} is not below train.epochs="
                             f"{cfg.train.epochs}: PBT would never exploit; lower it or raise train.epochs")
        if not [k for k in space if k not in NOT_MUTATED]:
            raise SweepError("tune.space: PBT needs at least one key to perturb besides model.unfreeze_depth "
                             "(which it never mutates: a trial takes its donor's depth with its checkpoint)")
        if t.scheduler == "pb2":
            import importlib.util

            missing = [m for m in ("sklearn", "scipy") if importlib.util.find_spec(m) is None]
            if missing:
                raise SweepError(f"tune.scheduler=pb2 needs {' and '.join(missing)} (pip install scikit-learn "
                                 f"scipy); or use tune.scheduler=pbt")
            if not [d for k, d in space.items() if k not in NOT_MUTATED and d.kind != "choice" and d.kind != "grid"]:
                raise SweepError("tune.scheduler=pb2 needs a continuous key in tune.space (loguniform, uniform, "
                                 "quniform, randint)")
    if t.search_alg == "optuna" and any(d.kind == "grid" for d in space.values()):
        grids = ", ".join(k for k, d in space.items() if d.kind == "grid")
        raise SweepError(f"tune.search_alg=optuna cannot search grid() entries ({grids}): use choice([...]) "
                         f"with Optuna, or tune.search_alg=random for a grid")
    if t.metric not in ("val_top1", "val_top5", "val_loss", "train_loss"):
        raise SweepError(f"tune.metric={t.metric!r} is not reported every epoch; use val_top1, val_top5, val_loss "
                         f"or train_loss")
    wrong_way = {"val_loss": "max", "train_loss": "max", "val_top1": "min", "val_top5": "min"}
    if wrong_way.get(t.metric) == t.mode:
        say(f"warning: tune.mode={t.mode} with tune.metric={t.metric}: the sweep looks for the "
            f"{'worst' if t.mode == 'min' else 'highest-loss'} trial")


def trial_needs(cfg: Config, cluster: dict) -> dict[str, float]:
    """CPUs and GPUs one trial's workers hold (its driver holds none)."""
    return {"GPU": 0.0, **placement.run_needs(cfg, placement.use_gpu(cfg, cluster))}


def plan_concurrency(cfg: Config, cluster: dict, total_trials: int) -> int:
    """tune.max_concurrent_trials, or how many trials' workers the cluster holds at once."""
    need = trial_needs(cfg, cluster)
    fits = placement.trials_that_fit(cfg, cluster)
    fixed_cluster = not os.environ.get("RAY_ADDRESS")  # an embedded cluster cannot grow; a remote one may
    wanted = cfg.tune.max_concurrent_trials
    if wanted:
        if fixed_cluster and wanted > max(fits, 1):
            raise SweepError(f"tune.max_concurrent_trials={wanted}, but this cluster ({cluster.get('CPU', 0):g} "
                             f"CPUs, {cluster.get('GPU', 0):g} GPUs) holds {fits} trial(s) of {_needs(need)} at "
                             f"once: the others would wait for workers and fail; lower it or set 0 (automatic)")
        return min(wanted, total_trials)
    return max(1, min(fits, total_trials))


def _needs(need: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}s" for k, v in need.items() if v > 0)


def make_searcher(cfg: Config, total_trials: int, concurrency: int):
    """The search algorithm, limited to `concurrency` trials at once (Tune ignores TuneConfig.max_concurrent_trials
    for a BasicVariantGenerator passed in, so the limit is set here for both)."""
    if cfg.tune.search_alg == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE models the results of the trials so far; its first trials are random. Optuna's default of 10 start-up
        # trials would make a small sweep all random, so half the budget (at most 10) is used instead.
        startup = min(10, max(1, total_trials // 2))
        sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=startup)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency)


# ------------------------------------------------------------------------------------------------ resume


def _comparable(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if not k.startswith(RESUME_FREE_PREFIXES)}


def check_same_sweep(cfg: Config, sweep_dir: str) -> None:
    """A resumed sweep must run the config it started with: refuse a changed one, naming what changed."""
    url = f"{sweep_dir}/{SWEEP_CONFIG}"
    if not storage.exists(url):
        return
    try:
        saved = from_dict(yaml.safe_load(storage.read_text(url)), url)
    except (ConfigError, yaml.YAMLError) as e:
        raise SweepError(f"{sweep_dir}/{SWEEP_CONFIG} no longer loads ({e}): use --restart") from None
    old, new = _comparable(saved), _comparable(cfg)
    changed = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if changed:
        raise SweepError(f"the sweep in {sweep_dir} was started with a different config ({'; '.join(changed[:5])}"
                         f"{'; ...' if len(changed) > 5 else ''}): rerun with --restart to start it over, or set "
                         f"another tune.name")


# ------------------------------------------------------------------------------------------------ the sweep


def run_sweep(cfg: Config, *, restart: bool = False, retry_failed: bool = False) -> Sweep:
    """Run (or resume) the sweep `cfg.tune` describes over `cfg`, to the end; write and return its results."""


    cfg = absolute_paths(cfg)
    space = parse_space(cfg)  # bad keys and distributions fail here, before Ray starts
    check_plan(cfg, space)
    total = cfg.tune.num_samples * num_grid_points(space)
    sweep_dir = sweep_dir_of(cfg)
    preflight_sweep(cfg, space, sweep_dir, restart)
    if storage.is_empty(sweep_dir):  # a new folder: ours from now on (so --restart of a first run can remove it)
        storage.mark(sweep_dir, "sweep", name=cfg.tune.name)
    lock = storage.RunLock(sweep_dir, "sweep", log=say)
    try:
        lock.acquire()
    except storage.StorageError as e:
        raise SweepError(str(e)) from None
    try:
        return _run(cfg, space, total, sweep_dir, lock, restart, retry_failed)
    finally:
        lock.release()


def preflight_sweep(cfg: Config, space: dict[str, Dist], sweep_dir: str, restart: bool) -> None:
    """What a sweep can check before Ray starts: the config it resumes, the shards, a model skeleton for every
    searched depth, the weights, and that the sweep folder is distrain's (or new) and writable."""
    from distrain.train.preflight import check_model, check_shards

    if not restart:
        check_same_sweep(cfg, sweep_dir)  # a changed config is refused at once
    try:
        manifest = check_shards(cfg)
        depths = space["model.unfreeze_depth"].extremes() if "model.unfreeze_depth" in space else []
        for depth in [cfg.model.unfreeze_depth, *depths]:
            check_model(cfg.replace({"model.unfreeze_depth": depth}), list(manifest.classes))
    except PreflightError as e:
        raise SweepError(str(e)) from None
    marker = storage.owner(sweep_dir)
    if marker is not None and marker.get("kind") != "sweep":
        raise SweepError(f"{sweep_dir} is a {marker.get('kind')} folder of distrain's, not a sweep: choose another "
                         f"tune.name")
    if marker is None and storage.exists(sweep_dir) and not storage.is_empty(sweep_dir) \
            and not storage.exists(storage.join(sweep_dir, SWEEP_CONFIG)):
        raise SweepError(f"{sweep_dir} exists and distrain did not create it (no {storage.MARKER}): nothing was "
                         f"touched; choose another tune.name or scaling.storage_path")
    try:
        storage.check_writable(sweep_dir)
    except storage.StorageError as e:
        raise SweepError(f"scaling.storage_path: {e}") from None


def _run(cfg: Config, space: dict[str, Dist], total: int, sweep_dir: str, lock, restart: bool,
         retry_failed: bool) -> Sweep:
    import ray
    from ray import tune

    from distrain import runtime
    from distrain.tune.progress import TrialLines

    if not ray.is_initialized():
        runtime.connect()
    cluster = runtime.cluster_summary()
    try:
        check_cluster(cfg, cluster)  # a trial's workers fit, storage every node sees
    except PreflightError as e:
        raise SweepError(str(e)) from None
    concurrency = plan_concurrency(cfg, cluster, total)
    if restart:
        try:
            if storage.owner(sweep_dir) is not None or not storage.exists(storage.join(sweep_dir, SWEEP_CONFIG)):
                storage.remove_owned(sweep_dir, "sweep", " (--restart deletes only sweep folders distrain made)")
            else:  # a sweep of an earlier distrain without a marker: its sweep_config.yaml says it is one
                fs, path = storage.fs_of(sweep_dir)
                fs.rm(path, recursive=True)
        except storage.StorageError as e:
            raise SweepError(str(e)) from None
        lock.rewrite()

    trainable = trial_trainable(base=cfg.to_dict(), sweep=cfg.tune.name, sweep_dir=sweep_dir)
    resumed = not restart and tune.Tuner.can_restore(sweep_dir)
    if resumed:
        say(f"resuming sweep {cfg.tune.name} from {sweep_dir} (finished trials are kept"
            f"{'; failed trials run again' if retry_failed else ''})")
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=retry_failed,
                                   restart_errored=False)
    else:
        storage.mark(sweep_dir, "sweep", name=cfg.tune.name)
        storage.write_text(f"{sweep_dir}/{SWEEP_CONFIG}", to_yaml(cfg))
        need = trial_needs(cfg, cluster)
        say(f"sweep {cfg.tune.name}: {total} trial(s) ({cfg.tune.search_alg} search, {cfg.tune.scheduler} "
            f"scheduler), {concurrency} at a time, each {cfg.scaling.num_workers} worker(s) holding {_needs(need)}; "
            f"folder {sweep_dir}")
        tuner = tune.Tuner(
            trainable,
            param_space={key: d.to_tune() for key, d in space.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=make_scheduler(cfg, space),
                search_alg=make_searcher(cfg, total, concurrency), num_samples=cfg.tune.num_samples,
                reuse_actors=False,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=cfg.tune.name, storage_path=storage.absolute(cfg.scaling.storage_path),
                # distrain's one line per trial event instead of Tune's boxed tables (-v brings those back)
                verbose=0 if runtime.quiet_console() else 1,
                callbacks=[TrialLines(cfg.train.epochs, cfg.tune.scheduler, cfg.tune.metric)],
                # A failed trial is a result (bad hyperparameters), not something to retry; worker faults inside a
                # trial are Ray Train's to handle (train.max_failures).
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    before = {g["placement_group_id"] for g in own_placement_groups(quiet=True)}
    try:
        result_grid = tuner.fit()
    finally:
        release_leftovers(keep=before)
    unfinished = _unfinished(sweep_dir, len(result_grid), total)
    if unfinished:
        raise SweepInterrupted(f"sweep {cfg.tune.name} interrupted with {unfinished} of {total} trial(s) unfinished; "
                               f"rerun the same command to resume it from {sweep_dir}")
    trials = collect_trials(result_grid, sweep_dir, cfg)
    keys = list(space)
    summary = write_outputs(trials, cfg, keys, sweep_dir)
    summary["resumed"] = bool(resumed)
    table = rows(trials, keys, cfg.tune.scheduler)
    _log_sweep(cfg, table, trials, summary, sweep_dir)
    return Sweep(summary=summary, table=table)


def _unfinished(sweep_dir: str, num_results: int, total: int) -> int:
    """How many trials an interrupted Tune run left unfinished (0 when the sweep is complete).

    Tune returns normally, without raising, after Ctrl-C/SIGTERM; it then marks the running trials as terminated in
    memory but keeps them RUNNING in the saved experiment state (so that a restore runs them again), and it never
    creates the trials its searcher had not yet suggested. So count both.
    """
    missing = max(0, total - num_results)
    try:
        fs, path = storage.fs_of(sweep_dir)
        states = sorted(fs.glob(f"{path}/experiment_state-*.json"))
        if not states:
            return missing
        saved = json.loads(fs.cat_file(states[-1]))
        statuses = [json.loads(t[0]).get("status") for t in saved.get("trial_data", [])]
    except Exception:  # Tune's internal format: if it ever changes, fall back to the count
        return missing
    return missing + sum(st not in ("TERMINATED", "ERROR") for st in statuses)


def _log_sweep(cfg: Config, table: list[dict], trials, summary: dict, sweep_dir: str) -> None:
    """The sweep's own W&B run (trial table, best trial), when the tracking module provides it; never fatal."""
    from distrain.tracking import log_sweep_summary

    best = best_trial(trials, cfg.tune.metric, cfg.tune.mode)
    best_info = {} if best is None else {
        "trial": best.name, "params": best.params, "val_top1": summary.get("best_val_top1"),
        cfg.tune.metric: summary.get("best_metric"), "epoch": summary.get("best_epoch"),
        "config": summary.get("best_config"), "model": summary.get("best_model")}
    try:
        log_sweep_summary(cfg, table, best_info, sweep_dir)
    except Exception as e:  # W&B trouble must not cost the sweep's results
        warn(f"W&B sweep summary not logged ({type(e).__name__}: {e})")


# ------------------------------------------------------------------------------------------------ clean-up


def own_placement_groups(quiet: bool = False) -> list[dict]:
    """Placement groups of this Ray job that are not removed (Tune's trial groups, Train's worker groups)."""
    import ray
    from ray.util.state import list_placement_groups

    ctx = ray.get_runtime_context()
    try:
        groups = list_placement_groups(address=ctx.gcs_address, filters=[("state", "!=", "REMOVED"),
                                                                         ("creator_job_id", "=", ctx.get_job_id())],
                                       detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception:  # the state API needs the dashboard, which a cluster may lack
        if quiet:
            return []
        raise
    return [g.asdict() for g in groups]


def release_leftovers(keep: set[str] = frozenset(), timeout_s: float = 20.0) -> list[str]:
    """Remove placement groups that this sweep's trials left behind (not those in `keep`, which existed before it
    started); returns their ids. trial.py aborts the Train run of a stopped trial, so normally there are none: this
    is the safety net for trials stopped before their run started, since a leaked group holds its CPUs/GPUs for good.
    """
    try:
        deadline = time.monotonic() + timeout_s
        left = [g for g in own_placement_groups() if g["placement_group_id"] not in keep]
        while left and time.monotonic() < deadline:  # Ray Train's own clean-up may still be at work
            time.sleep(1.0)
            left = [g for g in own_placement_groups() if g["placement_group_id"] not in keep]
        from ray.util.placement_group import remove_placement_group

        for g in left:
            remove_placement_group(_compat.placement_group_by_id(g["placement_group_id"]))
        if left:
            say(f"removed {len(left)} placement group(s) left behind by stopped trials")
        return [g["placement_group_id"] for g in left]
    except Exception as e:
        warn(f"could not check for leftover placement groups ({type(e).__name__}: {e})")
        return []
