"""Connecting to Ray: the cluster named by RAY_ADDRESS, or an embedded local one that keeps to loopback.

Usage:
    from distrain import runtime
    runtime.connect()                 # RAY_ADDRESS, else a cluster `ray start`ed on this machine, else a new one
    runtime.cluster_summary()         # {'nodes': 1, 'CPU': 2.0, 'GPU': 0.0, ...}

Why this module exists: Ray phones home at start even when offline (a usage report, sent even when usage stats
are disabled, and cloud-metadata probes from the dashboard). An embedded cluster that distrain starts on a user's
machine should not do that, so `quiet_ray_env()` points the report at loopback and `isolated_home()` gives Ray's
processes a HOME whose `ray_bootstrap_config.yaml` says `provider: local` (the dashboard skips its cloud probes
then). The Makefile, the tests and the demo use both; clusters that users start themselves keep their settings.
"""

from __future__ import annotations

import os
from pathlib import Path

# Environment that keeps Ray's start-up traffic on this machine, and Ray's defaults distrain tunes (documented Ray
# environment variables). Values already set by the user win.
QUIET_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:1/",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    # Train V2 is the default in the Ray we pin; say so explicitly so a future default change cannot surprise us.
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray's dashboard otherwise warns (and waits) on machines with few CPUs.
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_DEDUP_LOGS": "1",
    # The Train controller polls its workers every 2 s by default, so a run that ends (or a worker that dies) is
    # noticed up to 2 s late at every step of a run's life: 0.5 s cut a 2-worker run's fixed cost by ~4 s here.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

# Set to "0" for single-node clusters: every Ray process then binds and connects to 127.0.0.1 only.
LOOPBACK_ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

BOOTSTRAP_CONFIG = ("# Written by distrain: a local cluster, so Ray skips its cloud-metadata probes.\n"
                    "provider:\n  type: local\n")


_QUIET: bool | None = None  # the console choice of a command (None: a library caller, Ray's defaults apply)


def set_console(verbose: bool) -> None:
    """A command's console: quiet (distrain's lines only; Ray's worker output stays in Ray's logs and the run folder's
    ray.log) unless `verbose` (-v: Ray's stream on the console too). Call before connect()."""
    import logging

    global _QUIET
    _QUIET = not verbose
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables off with verbose=0 (see tune/sweep.py)
    if _QUIET:
        for name in ("ray", "ray.train", "ray.tune", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_console() -> bool:
    """Whether a command asked for the quiet console (set_console(verbose=False))."""
    return bool(_QUIET)


def quiet_ray_env() -> dict[str, str]:
    """Set QUIET_RAY_ENV in os.environ (without overriding the user's values); returns what is in effect."""
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in QUIET_RAY_ENV}


def isolated_home(path: str | Path) -> Path:
    """Make `path` a HOME for Ray processes: create it and its `ray_bootstrap_config.yaml`, set os.environ['HOME']."""
    home = Path(path).absolute()
    home.mkdir(parents=True, exist_ok=True)
    bootstrap = home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        bootstrap.write_text(BOOTSTRAP_CONFIG)
    os.environ["HOME"] = str(home)
    return home


def connect(num_cpus: int | None = None, num_gpus: int | None = None, object_store_gb: float = 2.0,
            log_to_driver: bool | None = None):
    """Connect to the cluster in RAY_ADDRESS, or one `ray start`ed on this machine, or start a local one (always a
    new one when num_cpus/num_gpus are given); returns ray, initialised. log_to_driver: Ray's worker output on this
    process's console (default: yes, unless a command chose the quiet console)."""
    quiet_ray_env()
    if log_to_driver is None:
        log_to_driver = not quiet_console()
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return ray
    if num_cpus is None and num_gpus is None and _started_cluster_here():
        # A cluster started with `ray start` on this machine: join it, as Ray's own default does.
        try:
            ray.init(address="auto", log_to_driver=log_to_driver)
            return ray
        except ConnectionError:
            pass  # a stale record of a cluster that is gone: start our own
    _loopback_only()
    # Cap the object store: /dev/shm is large here and the default would take memory workers need.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
             object_store_memory=int(object_store_gb * 1024**3), include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    return ray


def connected() -> bool:
    import ray

    return ray.is_initialized()


def _started_cluster_here() -> bool:
    from distrain import _compat

    try:
        return bool(_compat.ray_address_on_this_machine())
    except _compat.CompatError:  # if it moved, behave as if no cluster runs here (tests/test_compat.py says so)
        return False


def _loopback_only() -> None:
    """Bind a local cluster to 127.0.0.1. Ray otherwise picks the machine's outward address even for a
    single-node cluster (it refuses loopback unless multi-node support is off, as on macOS/Windows)."""
    os.environ.setdefault(LOOPBACK_ENV_VAR, "0")
    if os.environ[LOOPBACK_ENV_VAR] == "0":
        from distrain import _compat

        _compat.bind_local_cluster_to_loopback()


def local_cluster_env() -> dict[str, str]:
    """Environment for `ray start --head` of a single-node cluster that keeps to loopback (tests, demo)."""
    return {**QUIET_RAY_ENV, LOOPBACK_ENV_VAR: "0"}


def cluster_summary() -> dict:
    """Nodes alive and total resources of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {"nodes": len(nodes), "CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0)),
            "memory_gb": round(total.get("memory", 0) / 1024**3, 1)}
