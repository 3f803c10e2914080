"""One trial of a sweep: a Tune trainable that runs one Ray Train run, and ends it cleanly when Tune stops the trial.

Usage (the sweep driver, distrain/tune/sweep.py):
    trainable = trial_trainable(base=cfg.to_dict(), sweep="sweep", sweep_dir="/runs/sweep")
    tune.Tuner(trainable, param_space={...}, ...)

A trial applies its sampled values to the base config, and its identity as config keys (`train.name` = the trial,
`scaling.storage_path` = the sweep's `runs/`, `train.job_type` = trial, `train.group` = the sweep), and calls
`distrain.train.fit()` with Ray Train V2's `TuneReportCallback`, which forwards rank 0's report of every epoch to
Tune. The trial driver only waits on the Train
controller, so it reserves no CPU (`TRIAL_DRIVER_RESOURCES`).

Why the trainable is a class and not the bare function: when a scheduler (ASHA) stops a trial, Tune calls the trial
actor's `cleanup()` and then ends the actor. The Train controller is owned by that actor and dies with it, so its
workers and placement group would be left to Ray Train's detached clean-up actor, which polls the state API and is
known to miss (it cannot tell which cluster to ask when several Ray instances run on one machine, and some Ray
versions leaked these groups). A leaked group keeps its CPUs/GPUs, and the next trial's workers then wait for them
until their start-up retries run out. So the controller sends its own handle to the trial driver when it starts
(`_ControllerHandle`), and `cleanup()` aborts the Train run through it: workers stopped, placement group removed,
before Tune moves on.
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

# State of the trial running in this actor process (Tune runs one trial per actor: reuse_actors=False).
_ACTIVE: dict[str, Any] = {"queue": None, "stopping": False, "attempt": None}


def run_trial(config: dict, *, base: dict, sweep: str, sweep_dir: str) -> None:
    """Tune function trainable: one trial = one Ray Train run of the base config with this trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from distrain.config import from_dict
    from distrain.train import fit

    name = tune.get_context().get_trial_name()
    config = {k: v.item() if hasattr(v, "item") else v for k, v in config.items()}  # numpy scalars → Python
    cfg = from_dict(base).replace({**config, "train.name": name, "scaling.storage_path": f"{sweep_dir}/{RUNS}",
                                   "train.job_type": "trial", "train.group": sweep})
    _ACTIVE["attempt"] = record_attempt(sweep_dir, name, config)
    say(f"trial {name} starts: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    callbacks = [TuneReportCallback()]
    handle = _controller_handle_callback()
    if handle is not None:
        _ACTIVE["queue"] = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callbacks.append(handle(_ACTIVE["queue"]))
    try:
        # A non-finite loss or a worker group that keeps failing raises TrainingError: Tune records it as this
        # trial's error and the sweep carries on.
        fit(cfg, callbacks=callbacks)
    except Exception:
        if _ACTIVE["stopping"]:
            return  # Tune stopped the trial and cleanup() aborted its run: not a failure
        raise
    finally:
        _ACTIVE["queue"] = None  # the run is over: nothing left for cleanup() to abort


def _controller_handle_callback():
    """The Ray Train controller callback class (DeveloperAPI of Train V2), or None if this Ray lacks it."""
    try:
        ControllerCallback = _compat.controller_callback_base()
    except _compat.CompatError:
        return None

    class _ControllerHandle(ControllerCallback):
        """Runs in the Train controller: hands the controller's own actor handle to the trial driver."""

        def __init__(self, queue):
            self._queue = queue

        def after_controller_start(self, train_run_context) -> None:
            import ray

            try:
                self._queue.put(ray.get_runtime_context().current_actor, timeout=10)
            except Exception as e:
                warn(f"trial driver not told about its Train controller ({type(e).__name__}: {e})")

    return _ControllerHandle


def abort_inner_run(timeout_s: float = 60.0) -> bool:
    """Abort this actor's Train run, if one is going (Tune is stopping the trial). Returns whether it tried."""
    _ACTIVE["stopping"] = True
    queue = _ACTIVE["queue"]
    if queue is None:
        return False
    import ray

    try:
        controller = queue.get(block=False)
    except Exception:  # Empty: the controller never started; or the queue actor is gone
        return False
    try:
        # abort() stops the workers, removes the placement group, then exits the controller: the call ends with
        # the actor's death, which is the expected outcome.
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:
        pass
    return True


def trial_trainable(*, base: dict, sweep: str, sweep_dir: str):
    """The Tune trainable for a sweep: run_trial with its parameters, a cleanup that aborts the Train run, and
    TRIAL_DRIVER_RESOURCES."""
    from ray import tune

    function = _compat.tune_function_trainable(tune.with_parameters(run_trial, base=base, sweep=sweep,
                                                                    sweep_dir=sweep_dir))

    class DistrainTrial(function):
        def cleanup(self):
            if abort_inner_run():
                mark_stopped(_ACTIVE["attempt"])
                say(f"trial {self.trial_name} stopped: its Train run was aborted and its workers released")
            super().cleanup()

    return tune.with_resources(DistrainTrial, TRIAL_DRIVER_RESOURCES)


def record_attempt(sweep_dir: str, name: str, params: dict) -> str:
    """One small file per start of a trial (a resumed trial has several), named so that they sort by time; plain
    files work on object stores too. Returns its URL."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}-{os.getpid()}"
    url = f"{sweep_dir}/{ATTEMPTS}/{name}/{stamp}.json"
    storage.write_json(url, {"trial": name, "params": params, "pid": os.getpid(), "started": time.time()})
    return url


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
