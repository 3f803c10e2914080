"""One trial of a sweep: a Tune trainable that runs one Ray Train run, and ends it cleanly when Tune stops the trial.

Usage (the sweep driver, distrain/tune/sweep.py):
    trainable = trial_trainable(base=cfg.to_dict(), sweep="sweep", sweep_dir="/runs/sweep")
    tune.Tuner(trainable, param_space={...}, ...)

A trial applies its sampled values to the base config, and its identity as config keys (`train.name` = the trial,
`scaling.storage_path` = the sweep's `runs/`, `train.job_type` = trial, `train.group` = the sweep), and calls
`distrain.train.fit()` in a thread, reporting each epoch to Tune from rank 0's posts (with its Train checkpoint as
a Tune checkpoint under PBT, which is what an exploit clones: public `ray.tune.report(..., checkpoint=...)` and
`ray.tune.get_checkpoint()`, where Train V2's TuneReportCallback reports only a path). The trial driver only
waits on the Train controller, so it reserves no CPU (`TRIAL_DRIVER_RESOURCES`).

Why the trainable is a class and not the bare function: when a scheduler (ASHA) stops a trial, Tune calls the trial
actor's `cleanup()` and then ends the actor. The Train controller is owned by that actor and dies with it, which
would cut the run off mid-step: W&B left unfinished, workers and placement group left to Ray Train's detached
clean-up actor (known to miss them when several Ray instances share a machine; a leaked group keeps its CPUs/GPUs
and the next trial waits for them). So `cleanup()` first asks the run to stop (train/control.py: every rank stops
after the same step, the W&B run is finished with status `stopped`, Ray Train ends the run normally), waits up to
STOP_GRACE_S for fit() to return, and only then aborts the Train run through its controller's handle.
"""

from __future__ import annotations

import os
import time
from typing import Any

from distrain import _compat, storage
from distrain.console import say, warn

# What Tune reserves for a trial's driver: no CPU (it only waits on the Train controller, which itself takes none);
# Tune refuses an empty request, so it asks for a little memory instead.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}
RUNS = "runs"  # <sweep_dir>/runs/<trial>/ is each trial's Ray Train run folder
ATTEMPTS = "attempts"  # <sweep_dir>/attempts/<trial>/*.json: one record per start of a trial

STOP_GRACE_S = 60.0  # how long a stopped trial may take to finish its step and close W&B before it is aborted

# State of the trial running in this actor process (Tune runs one trial per actor: reuse_actors=False).
_ACTIVE: dict[str, Any] = {"handle": None, "stopping": False, "attempt": None, "done": None}


def run_trial(config: dict, *, base: dict, sweep: str, sweep_dir: str) -> None:
    """Tune function trainable: one trial = one Ray Train run of the base config with this trial's values.

    The Train run goes in a thread; this thread reports each epoch to Tune as rank 0 posts it (the run's control
    actor, train/control.py), with the epoch's Train checkpoint as a Tune checkpoint under PBT (the checkpoint a
    weaker trial takes over). A trial Tune restores from a checkpoint (PBT's exploit, or a resumed PBT sweep)
    starts a new Train run, `<trial>-g<N>`, from it (`train.init_from`)."""
    import threading

    from ray import tune

    from distrain.config import from_dict
    from distrain.train import fit
    from distrain.train.control import RunHandle

    name = tune.get_context().get_trial_name()
    config = {k: v.item() if hasattr(v, "item") else v for k, v in config.items()}  # numpy scalars → Python
    base_cfg = from_dict(base)
    overrides = {**config, "train.name": name, "scaling.storage_path": f"{sweep_dir}/{RUNS}",
                 "train.job_type": "trial", "train.group": sweep}
    start = tune.get_checkpoint()
    lineage: dict[str, Any] = {}
    if start is not None:
        url = storage.url_of(sweep_dir, start.path) if "://" not in start.path else start.path
        generation = attempts(sweep_dir, name)
        overrides.update({"train.name": f"{name}-g{generation}", "train.init_from": url})
        lineage = {"from": url, "donor": _trial_of(url), "start_epoch": _epoch_of(url)}
        if lineage["start_epoch"] >= int(config.get("train.epochs", base_cfg.train.epochs)):
            # restored from a checkpoint of the last epoch (PBT acted on a final result): nothing left to train
            say(f"trial {name}: its checkpoint is of the last epoch; nothing left to train")
            return
    cfg = base_cfg.replace(overrides)
    _ACTIVE["attempt"] = record_attempt(sweep_dir, name, config, **lineage)
    say(f"trial {name} starts: " + ", ".join(f"{k}={v}" for k, v in config.items())
        + (f" (from {lineage['donor']}'s checkpoint of epoch {lineage['start_epoch']})" if lineage else ""))
    trial_id = tune.get_context().get_trial_id()
    handle = RunHandle(stop_name(sweep, trial_id))
    _ACTIVE["handle"], _ACTIVE["done"] = handle, threading.Event()
    box: dict[str, Any] = {}

    def train() -> None:
        try:
            box["summary"] = fit(cfg, handle=handle)
        except BaseException as e:  # re-raised below, in Tune's thread
            box["error"] = e
        finally:
            _ACTIVE["done"].set()

    thread = threading.Thread(target=train, name="distrain-trial-run", daemon=True)
    thread.start()
    checkpoints = base_cfg.tune.scheduler in ("pbt", "pb2")
    try:
        _report_epochs(handle.control, thread, checkpoints)
    finally:
        thread.join()
        _ACTIVE["handle"] = None  # the run is over: nothing left for cleanup() to stop
    if "error" in box:
        if _ACTIVE["stopping"]:
            return  # Tune stopped the trial before its first epoch ended: not a failure
        # A non-finite loss or a worker group that keeps failing raises TrainingError: Tune records it as this
        # trial's error and the sweep carries on.
        raise box["error"]


def _report_epochs(control, thread, checkpoints: bool) -> None:
    """Report every epoch rank 0 posts to Tune (with its checkpoint when `checkpoints`), until the run ends."""
    import ray
    from ray import tune

    from distrain.train.control import CALL_TIMEOUT_S

    seen = 0
    while True:
        alive = thread.is_alive()
        try:
            seen, events = ray.get(control.events.remote(seen), timeout=CALL_TIMEOUT_S)
        except Exception:  # the control actor went with its run
            events = []
        for e in events:
            if "history" not in e or "checkpoint" not in e:
                continue
            metrics = {k: v for k, v in e["history"][-1].items() if k != "val_per_class_acc"}
            metrics["checkpoint_path"] = e["checkpoint"]
            if checkpoints:
                tune.report(metrics, checkpoint=tune.Checkpoint(e["checkpoint"]))
            else:
                tune.report(metrics)
        if not alive:
            return
        thread.join(0.3)


def _trial_of(url: str) -> str:
    """The trial whose Tune checkpoint `url` is (<sweep>/<trial>/checkpoint_NNNNNN)."""
    parts = url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def _epoch_of(url: str) -> int:
    try:
        return int(storage.read_json(storage.join(url, "meta.json"))["epoch"])
    except Exception:  # only informative
        return 0


def stop_name(sweep: str, trial_id: str) -> str:
    """The name of a trial's stop flag actor: how the sweep's scheduler reaches it (sweep.make_scheduler)."""
    return f"distrain-stop-{sweep}-{trial_id}"


def stop_inner_run(grace_s: float = STOP_GRACE_S) -> bool:
    """Stop this actor's Train run, if one is going (Tune is stopping the trial): ask, wait, then abort.
    Returns whether there was one."""
    _ACTIVE["stopping"] = True
    handle, done = _ACTIVE["handle"], _ACTIVE["done"]
    if handle is None:
        return False
    handle.stop("stopped by Tune")
    if done is None or not done.wait(grace_s):
        warn(f"the trial's run did not stop within {grace_s:g} s; aborting it")
        handle.abort()
    return True


def trial_trainable(*, base: dict, sweep: str, sweep_dir: str):
    """The Tune trainable for a sweep: run_trial with its parameters, a cleanup that aborts the Train run, and
    TRIAL_DRIVER_RESOURCES."""
    from ray import tune

    function = _compat.tune_function_trainable(tune.with_parameters(run_trial, base=base, sweep=sweep,
                                                                    sweep_dir=sweep_dir))

    class DistrainTrial(function):
        def cleanup(self):
            if stop_inner_run():
                mark_stopped(_ACTIVE["attempt"])
                say(f"trial {self.trial_name} stopped: its Train run ended and its workers were released")
            super().cleanup()

    return tune.with_resources(DistrainTrial, TRIAL_DRIVER_RESOURCES)


def record_attempt(sweep_dir: str, name: str, params: dict, **lineage: Any) -> str:
    """One small file per start of a trial (a resumed trial has several), named so that they sort by time; plain
    files work on object stores too. `lineage`: where a PBT trial's run started from (from, donor, start_epoch).
    Returns its URL."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}-{os.getpid()}"
    url = f"{sweep_dir}/{ATTEMPTS}/{name}/{stamp}.json"
    storage.write_json(url, {"trial": name, "params": params, "pid": os.getpid(), "started": time.time(),
                             **lineage})
    return url


def lineage(sweep_dir: str, name: str) -> list[dict]:
    """Every start of a trial, oldest first: {params, from, donor, start_epoch} (the last three for PBT)."""
    out = []
    for url in _records(sweep_dir, name):
        try:
            out.append(storage.read_json(url))
        except (OSError, ValueError):
            continue
    return out


def mark_stopped(url: str | None) -> None:
    """Note in the attempt's record that Tune stopped it (a scheduler decision, or the sweep being interrupted)."""
    if url is None:
        return
    try:
        record = storage.read_json(url)
        record["stopped"] = time.time()
        storage.write_json(url, record)
    except Exception as e:  # the table then infers the stop from the epochs run
        warn(f"could not record the stop of {url} ({type(e).__name__}: {e})")


def _records(sweep_dir: str, name: str) -> list[str]:
    fs, path = storage.fs_of(f"{sweep_dir}/{ATTEMPTS}/{name}")
    return [storage.url_of(sweep_dir, p) for p in sorted(fs.glob(f"{path}/*.json"))] if fs.exists(path) else []


def attempts(sweep_dir: str, name: str) -> int:
    """How many times a trial was started."""
    return len(_records(sweep_dir, name))


def stopped_by_tune(sweep_dir: str, name: str) -> bool:
    """Whether Tune stopped the trial's last attempt while its Train run was still going."""
    records = _records(sweep_dir, name)
    if not records:
        return False
    try:
        return "stopped" in storage.read_json(records[-1])
    except (OSError, ValueError):
        return False
