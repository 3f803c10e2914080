"""The one adapter to Ray's private internals: every use of a name Ray does not publish lives here, with why.

Usage:
    from distrain import _compat
    _compat.check_versions()          # raises CompatError naming what moved when Ray is not the version we pin

Each function below says which private name it uses, why distrain needs it, and which public API would replace it.
tests/test_compat.py calls every one of them against the installed Ray, so an upgrade that moves one fails there,
in one place, with this module's message, instead of somewhere in the middle of a training run.
"""

from __future__ import annotations

import logging
import os

PINNED_RAY = "2.60.0"


class CompatError(RuntimeError):
    """A private Ray API distrain relies on is missing or changed (after a Ray upgrade)."""


def _missing(what: str, e: Exception) -> CompatError:
    import ray

    return CompatError(f"Ray {ray.__version__} lacks {what} ({type(e).__name__}: {e}); distrain {PINNED_RAY}-pinned "
                       f"code in distrain/_compat.py needs updating")


def check_versions() -> None:
    import ray

    if ray.__version__ != PINNED_RAY:
        raise CompatError(f"distrain is pinned to Ray {PINNED_RAY} (pyproject.toml) but Ray {ray.__version__} is "
                          f"installed; the private APIs in distrain/_compat.py may have moved")


# --------------------------------------------------------------------------------------------------- runtime


def ray_address_on_this_machine() -> str | None:
    """The address of a cluster `ray start`ed on this machine, if Ray recorded one.

    Private: ray._private.utils.read_ray_address. Why: to join such a cluster as `ray.init()` itself would, without
    `ray.init(address="auto")` blocking for a minute on a stale record. Public replacement: none (Ray documents the
    behaviour of address="auto", not the lookup)."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError as e:
        raise _missing("ray._private.utils.read_ray_address", e) from None
    return read_ray_address() or None


def bind_local_cluster_to_loopback() -> None:
    """Make a cluster that `ray.init()` starts bind every service to 127.0.0.1.

    Private: ray._private.ray_constants.ENABLE_RAY_CLUSTER (what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets at import).
    Why: Ray picks the machine's outward address even for a single-node cluster; distrain's embedded cluster must
    stay on loopback. Public replacement: none for `ray.init`; `ray start --node-ip-address=127.0.0.1` for CLI
    clusters."""
    try:
        from ray._private import ray_constants
    except ImportError as e:
        raise _missing("ray._private.ray_constants", e) from None
    ray_constants.ENABLE_RAY_CLUSTER = False


def reload_auth_mode() -> None:
    """Let an imported Ray read RAY_AUTH_MODE again (it caches its config at import).

    Private: ray._raylet.Config.initialize. Why: `distrain submit` turns on token authentication when a token is at
    hand, after Ray may already be imported. Public replacement: none; setting RAY_AUTH_MODE before importing Ray."""
    import sys

    if "ray" not in sys.modules:
        return
    try:
        from ray._raylet import Config
    except ImportError as e:
        raise _missing("ray._raylet.Config", e) from None
    Config.initialize("")


def upload_files(root, excludes: list[str], include_gitignore: bool) -> dict[str, int]:
    """The files `ray job submit --working-dir root` would upload, with their sizes: Ray's own walker, default
    excludes and ignore-file rules, so the size distrain checks is the size of the package Ray builds.

    Private: ray._private.runtime_env.packaging._dir_travel/_get_excludes and
    ray._private.ray_constants.get_runtime_env_default_excludes. Why: to refuse a job over the dashboard's upload
    limit before uploading, naming the largest files. Public replacement: none (Ray only fails after the upload)."""
    from pathlib import Path

    try:
        from ray._private.ray_constants import get_runtime_env_default_excludes
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError as e:
        raise _missing("ray._private.runtime_env.packaging._dir_travel", e) from None
    root = Path(root)
    files: dict[str, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    quiet = logging.getLogger("distrain.launch.scan")  # Ray's walker logs every ignore file it reads at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, get_runtime_env_default_excludes() + list(excludes))], handler,
                include_gitignore=include_gitignore, logger=quiet)
    return files


# --------------------------------------------------------------------------------------------------- Train and Tune


def controller_callback_base():
    """The base class of Ray Train V2 controller callbacks (`after_controller_start` runs inside the controller).

    Private: ray.train.v2._internal.execution.callback.ControllerCallback (a DeveloperAPI of Train V2). Why: a
    trial's driver needs its Train controller's actor handle to abort the run when Tune stops the trial, so that its
    workers and placement group are released before the next trial starts. Public replacement: none in 2.60
    (`ray.train.UserCallback` has no start hook)."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError as e:
        raise _missing("ray.train.v2._internal.execution.callback.ControllerCallback", e) from None
    return ControllerCallback


def quiet_train_report_log() -> None:
    """In a Train worker: stop Ray Train's per-rank "Reporting training result ... TrainingReport(...)" INFO line.

    Private: the logger of ray.train.v2._internal.execution.context, which is named after the module's file path
    (so `RunConfig(logging_config=LoggingConfig(...))`, which filters `ray.train.*`, does not reach it). Why: one
    several-hundred-character line per rank per epoch drowns distrain's console. Public replacement: none in 2.60."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError as e:
        raise _missing("ray.train.v2._internal.execution.context", e) from None
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    getattr(context, "logger", logging.getLogger(context.__file__)).setLevel(logging.WARNING)


def placement_group_by_id(hex_id: str):
    """The PlacementGroup of an id (as the state API lists it), to remove it with the public
    `ray.util.remove_placement_group`.

    Private: ray._raylet.PlacementGroupID. Why: a Tune trial stopped before its Train run started can leave an
    unnamed placement group holding CPUs/GPUs for good; the public `remove_placement_group` takes a PlacementGroup,
    and only `get_placement_group(name)` makes one, for named groups. Public replacement: none for unnamed groups."""
    try:
        from ray._raylet import PlacementGroupID
    except ImportError as e:
        raise _missing("ray._raylet.PlacementGroupID", e) from None
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(hex_id))


def tune_function_trainable(fn):
    """The Trainable class Tune builds from a function, so distrain can subclass it (a `cleanup` that aborts the
    trial's Train run).

    Semi-private: ray.tune.trainable.function_trainable.wrap_function (not exported from ray.tune). Why: Tune calls a
    trainable's cleanup() when it stops a trial, and only a class has one. Public replacement: a class Trainable,
    which would give up Tune's function-trainable reporting (`ray.tune.report`) that Train V2's TuneReportCallback
    relies on."""
    try:
        from ray.tune.trainable.function_trainable import wrap_function
    except ImportError as e:
        raise _missing("ray.tune.trainable.function_trainable.wrap_function", e) from None
    return wrap_function(fn)


def ray_env_flags() -> dict[str, str]:
    """Ray's own switches distrain sets for processes it starts (documented env vars, listed here for one home)."""
    return {k: os.environ[k] for k in ("RAY_TRAIN_V2_ENABLED",) if k in os.environ}
