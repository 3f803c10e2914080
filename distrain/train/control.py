"""Stopping a run from outside, promptly and cleanly: a small actor the driver owns and every rank polls.

Usage:
    handle = RunHandle(name=None)          # driver (fit() makes one per run): the control actor + controller hook
    fit(cfg, handle=handle)                # ... in another thread; then, from anywhere in the driver:
    handle.stop("Ctrl-C")                  # every rank stops after the same step, W&B finished as `stopped`
    handle.abort()                         # the fallback: the Train controller's abort()
    poller = StopPoller(control)           # on every rank (train/loop.py): stepper.stop_requested = poller
    stop_named("distrain-stop-...", why)   # a named handle's run, from elsewhere in the job (a sweep's scheduler)

Why an actor and a polling thread: the step loop must learn of a stop between two steps without a remote call per
step, so each rank asks the actor every `POLL_S` seconds in a daemon thread (every call bounded) and the loop reads
a local flag; the ranks then agree on it with one tiny all-reduce (core.Stepper), so every rank stops after the
same step, validation and W&B are finished with status `stopped`, and Ray Train ends the run normally. Aborting
(the Train controller's `abort()`: workers killed, placement group removed) is the fallback for a run that does not
stop within its grace period, and the second Ctrl-C.
"""

from __future__ import annotations

import threading
import time

from distrain import _compat
from distrain.console import warn

POLL_S = 0.2        # how often a rank asks whether to stop (a call of a few ms)
CALL_TIMEOUT_S = 10  # bound of every call to the control actor


class _RunControl:
    """The stop flag of one run (and why it was set), and the run's Train controller handle once it started."""

    def __init__(self):
        self.reason: str | None = None
        self.at: float | None = None
        self._controller = None

    def set_controller(self, handle) -> None:
        self._controller = [handle]  # wrapped: a handle returned bare would be resolved, not passed back

    def controller(self):
        return self._controller

    def request_stop(self, reason: str = "requested") -> None:
        if self.reason is None:
            self.reason, self.at = reason, time.time()

    def stop_requested(self) -> str | None:
        return self.reason


def create_control(name: str | None = None):
    """A RunControl actor for one run (no CPUs; owned by the caller, so it goes when the caller goes). `name`
    makes it reachable from elsewhere in the job (a sweep's scheduler stopping a trial: stop_named)."""
    import ray

    cls = ray.remote(num_cpus=0, max_concurrency=4)(_RunControl)
    if name:
        try:
            return cls.options(name=name).remote()
        except ValueError:  # the name is taken (an earlier attempt's actor not yet gone): stay reachable by handle
            pass
    return cls.remote()


def stop_named(name: str, reason: str) -> bool:
    """Ask the run whose control actor is called `name` to stop (without waiting); False if there is none."""
    import ray

    try:
        ray.get_actor(name).request_stop.remote(reason)
        return True
    except Exception:  # ValueError: no such actor (the run has not started, or is over)
        return False


def request_stop(control, reason: str) -> bool:
    """Ask the run to stop after its current step; False if the control actor is gone."""
    import ray

    try:
        ray.get(control.request_stop.remote(reason), timeout=CALL_TIMEOUT_S)
        return True
    except Exception:  # the run (and its control actor) already ended
        return False


class StopPoller:
    """A rank's view of the stop flag: a daemon thread polls the actor; calling the poller reads the local flag."""

    def __init__(self, control, period_s: float = POLL_S):
        self.control, self.period_s = control, period_s
        self.reason: str | None = None
        self._done = threading.Event()
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="distrain-stop-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        while not self._done.wait(self.period_s):
            try:
                reason = ray.get(self.control.stop_requested.remote(), timeout=CALL_TIMEOUT_S)
                self._failures = 0
            except Exception as e:  # the driver is gone (the run is ending anyway) or the call timed out
                self._failures += 1
                if self._failures == 3:
                    warn(f"stop flag unreachable ({type(e).__name__}); this rank keeps training until told "
                         f"otherwise by Ray")
                continue
            if reason:
                self.reason = reason
                return

    def __call__(self) -> bool:
        return self.reason is not None

    def why(self) -> str | None:
        """The stop's reason, asked now if this rank's thread has not seen it yet (another rank did first)."""
        if self.reason is None:
            import ray

            try:
                self.reason = ray.get(self.control.stop_requested.remote(), timeout=CALL_TIMEOUT_S)
            except Exception:  # the control actor is gone
                pass
        return self.reason

    def close(self) -> None:
        self._done.set()


def controller_handle_callback():
    """The Ray Train controller callback class that hands the controller's actor handle to a RunControl actor, or
    None if this Ray lacks the (DeveloperAPI) base class."""
    try:
        ControllerCallback = _compat.controller_callback_base()
    except _compat.CompatError:
        return None

    class _ControllerHandle(ControllerCallback):
        """Runs in the Train controller: hands the controller's own actor handle to the run's control actor."""

        def __init__(self, control):
            self._control = control

        def after_controller_start(self, train_run_context) -> None:
            import ray

            try:
                ray.get(self._control.set_controller.remote(ray.get_runtime_context().current_actor),
                        timeout=CALL_TIMEOUT_S)
            except Exception as e:
                warn(f"driver not told about its Train controller ({type(e).__name__}: {e})")

    return _ControllerHandle


class RunHandle:
    """What a driver holds of a running fit(): the stop flag the ranks poll, and the controller to abort."""

    def __init__(self, name: str | None = None):
        self.control = create_control(name)
        cls = controller_handle_callback()
        self._callback = cls(self.control) if cls is not None else None
        self.stopping: str | None = None

    @property
    def callbacks(self) -> list:
        return [self._callback] if self._callback is not None else []

    def stop(self, reason: str) -> bool:
        """Every rank stops after the same step (within about POLL_S plus one step), then the run ends normally."""
        self.stopping = reason
        return request_stop(self.control, reason)

    def abort(self, timeout_s: float = 60.0) -> bool:
        """Abort the Train run (workers stopped, placement group removed). Returns whether there was one."""
        import ray

        self.stopping = self.stopping or "aborted"
        try:
            held = ray.get(self.control.controller.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:  # the control actor is gone: so is the run it belonged to
            return False
        if not held:
            return False
        try:
            # abort() ends with the controller actor's death, which is the expected outcome of the call.
            ray.get(held[0].abort.remote(), timeout=timeout_s)
        except Exception:
            pass
        return True
