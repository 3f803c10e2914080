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

import os
import threading
import time

from distrain import _compat
from distrain.console import warn

POLL_S = 0.2        # how often a rank asks whether to stop (a call of a few ms)
CALL_TIMEOUT_S = 10  # bound of every call to the control actor
KEEP_EVENTS = 10_000  # console events a control actor holds for its driver


class _RunControl:
    """The stop flag of one run (and why it was set), and the run's Train controller handle once it started."""

    def __init__(self):
        self.reason: str | None = None
        self.at: float | None = None
        self._controller = None
        self._events: list[dict] = []  # the last KEEP_EVENTS of them
        self._posted = 0               # events ever posted: their sequence numbers are 0.._posted-1

    def post(self, event: dict) -> None:
        self._events.append(event)
        self._posted += 1
        del self._events[:-KEEP_EVENTS]  # a driver that stopped reading must not grow this without bound

    def events(self, since: int) -> tuple[int, list[dict]]:
        """(the sequence number to ask from next time, the events from `since` on that are still kept)."""
        first = self._posted - len(self._events)
        return self._posted, self._events[max(0, since - first):]

    def register(self, role: str, actor_id: str, pid: int) -> None:
        """A process of the run (its Train controller, a worker), for run_dir/ray.log (train/run.py)."""
        self._processes = [*getattr(self, "_processes", []), (role, actor_id, pid)]

    def processes(self) -> list:
        return list(getattr(self, "_processes", []))

    def set_controller(self, handle) -> None:
        self._controller = [handle]  # wrapped: a handle returned bare would be resolved, not passed back

    def controller(self):
        return self._controller

    def set_data_epoch(self, epoch: int) -> None:
        """data.engine=ray_data: the epoch the ranks are about to read (rank 0 posts it; data/ray_data.py)."""
        self._data_epoch = int(epoch)

    def data_epoch(self) -> int:
        return getattr(self, "_data_epoch", 0)

    def request_stop(self, reason: str = "requested") -> None:
        if self.reason is None:
            self.reason, self.at = reason, time.time()

    def stop_requested(self) -> str | None:
        return self.reason


def create_control(name: str | None = None):
    """A RunControl actor for one run (no CPUs; owned by the caller, so it goes when the caller goes). `name`
    makes it reachable from elsewhere in the job (a sweep's scheduler stopping a trial: stop_named)."""
    import ray

    # One call at a time: a worker's console events then arrive in the order it posted them.
    cls = ray.remote(num_cpus=0)(_RunControl)
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
                ctx = ray.get_runtime_context()
                self._control.register.remote("TrainController", ctx.get_actor_id(), os.getpid())
                ray.get(self._control.set_controller.remote(ctx.current_actor), timeout=CALL_TIMEOUT_S)
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

    def close(self) -> None:
        """End the control actor now (the run is over). Without this a failed fit()'s actor lives on until the
        garbage collector frees the error's traceback, which holds the handle."""
        import ray

        try:
            ray.kill(self.control, no_restart=True)
        except Exception:  # already gone
            pass


def worker_sink(control, rank: int):
    """console.set_sink for a Train worker: its lines become events of the run's control actor (fire-and-forget;
    the driver prints them, train/run.py). Ranks other than 0 are named in their lines."""
    prefix = "" if rank == 0 else f"rank {rank}: "

    def sink(text: str, warning: bool | None) -> None:
        if warning:
            text = "warning: " + prefix + text.removeprefix("warning: ")
        else:
            text = prefix + text
        control.post.remote({"line": text, "warning": bool(warning), "progress": warning is None})

    return sink


class EventPrinter:
    """The driver's side of worker_sink: a thread printing the run's console events as they arrive."""

    def __init__(self, control, period_s: float = 0.3, curves: str | None = None):
        import sys

        self.control, self.period_s, self.seen, self.curves = control, period_s, 0, curves
        self.tty = sys.stdout.isatty()
        self._open_progress = False  # a progress line is on screen without its newline (TTY)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrain-console", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        import sys

        import ray

        from distrain.console import PREFIX

        try:
            self.seen, events = ray.get(self.control.events.remote(self.seen), timeout=CALL_TIMEOUT_S)
        except Exception:  # the control actor is gone with its run
            return
        history = next((e["history"] for e in reversed(events) if "history" in e), None)
        if history and self.curves:
            self._draw(history)
        for e in events:
            if "line" not in e:
                continue
            stream = sys.stderr if e.get("warning") else sys.stdout
            try:
                if self.tty and e.get("progress"):  # rewrite the line in place
                    sys.stdout.write("\r\033[K" + PREFIX + e["line"])
                    sys.stdout.flush()
                    self._open_progress = True
                    continue
                if self._open_progress:
                    sys.stdout.write("\r\033[K")
                    self._open_progress = False
                stream.write(PREFIX + e["line"] + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _draw(self, history: list[dict]) -> None:
        """curves.png in the run folder, redrawn at every epoch (here, off the workers' path)."""
        from distrain import storage
        from distrain.figures import curves_png

        try:
            storage.write_bytes(self.curves, curves_png(history, title=self.curves.rsplit("/", 2)[-2]))
        except Exception as e:  # a picture must never cost the run
            from distrain.console import warn

            warn(f"could not draw {self.curves} ({type(e).__name__}: {e})")
            self.curves = None

    def _run(self) -> None:
        while not self._done.wait(self.period_s):
            self._drain()

    def close(self) -> None:
        """Print what is left, then stop."""
        import time

        self._done.set()
        self._thread.join(timeout=CALL_TIMEOUT_S)
        self._drain()
        time.sleep(self.period_s)  # posts a worker sent just before it returned may still be on their way
        self._drain()
        if self._open_progress:
            import sys

            sys.stdout.write("\n")
