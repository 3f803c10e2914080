"""What `distrain submit` checks before it uploads anything, and how a check reads.

Usage:
    from distrain.launch.checks import Check, SubmitRefused, check_placement, check_wandb, data_checks
    check, spans = check_placement(cfg, "train", cluster)      # per node; spans: the run needs several nodes
    checks = data_checks(cfg, cluster.summary(), spans, "train", restart=False)   # the training preflight

The data and storage checks are the training driver's own (distrain.train.preflight): the same functions, run
here or, for a remote cluster whose paths mean something else there, on the cluster as a short check job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distrain import storage
from distrain.train import placement


class SubmitRefused(Exception):
    """A job that was not submitted, because a check failed (the message names every failed check)."""

    def __init__(self, message: str, checks: list[Check] | None = None):
        super().__init__(message)
        self.checks = checks or []


@dataclass


class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    where: str = "here"  # "here" or "cluster"


def check_placement(cfg, command: str, cluster) -> tuple[Check, bool]:
    """Whether the workers fit the nodes (counted per node, distrain.train.placement); also returns whether the run
    spans more than one node."""
    summary = cluster.summary()
    gpu = placement.use_gpu(cfg, summary)
    world = cfg.scaling.num_workers
    nodes = [{"CPU": n.cpu, "GPU": n.gpu} for n in cluster.nodes]
    total, best = placement.fits(cfg, nodes, gpu)
    spans = len(cluster.nodes) > 1 or best < world
    need = placement.describe_need(cfg, gpu) + (" per trial" if command == "tune" else "")
    if total >= world:
        where = "one node" if best >= world else "several nodes"
        check = Check("placement", "ok", f"{need} fit on {where} ({cluster.describe()})")
    else:
        msg = (f"{need} do not fit: the nodes hold {total} such worker(s) ({cluster.describe()}; counted per "
               f"node, a worker cannot straddle two)")
        if cluster.local:
            check = Check("placement", "fail", msg + ". Lower scaling.num_workers or data.loader_workers, or set "
                                                     "scaling.cpus_per_worker.")
        else:
            check = Check("placement", "warn", msg + f". The run waits for the autoscaler to add nodes and gives "
                                                     f"up after scaling.start_retries={cfg.scaling.start_retries} "
                                                     f"× 60 s.")
    if cfg.scaling.use_gpu == "auto" and summary["GPU"] == 0 and not cluster.local:
        check = Check("placement", "warn", check.detail + " scaling.use_gpu=auto and the cluster has no GPU "
                                                          "now: the run would train on CPUs. Set "
                                                          "scaling.use_gpu=true to have GPU nodes added.")
    return check, spans


def check_wandb(cfg, env: dict[str, str], key_on_cluster: bool) -> tuple[Check, bool]:
    """(check, whether to pass WANDB_API_KEY on to the job)."""
    mode, has_key = cfg.wandb.mode, bool(env.get("WANDB_API_KEY"))
    if mode in ("offline", "disabled"):
        return Check("wandb", "ok", f"wandb.mode={mode}" + (" (sync offline runs later with `wandb sync`)"
                                                            if mode == "offline" else "")), False
    if has_key:
        return Check("wandb", "ok", f"wandb.mode={mode}: WANDB_API_KEY from this environment goes to the job's "
                                    f"env_vars (in memory only)"), True
    if key_on_cluster:
        return Check("wandb", "ok", f"wandb.mode={mode}: the cluster's nodes provide WANDB_API_KEY"), False
    if mode == "online":
        return Check("wandb", "fail", "wandb.mode=online but WANDB_API_KEY is not set here: export it, pass "
                                      "--wandb-key-on-cluster if the nodes set it (Kubernetes secret), or set "
                                      "wandb.mode=offline"), False
    return Check("wandb", "warn", "wandb.mode=auto and no WANDB_API_KEY here: the run logs offline unless the "
                                  "cluster's nodes set the key (then pass --wandb-key-on-cluster)"), False


@contextlib.contextmanager
def environ(overlay: dict[str, str]) -> Iterator[None]:
    """os.environ with `overlay` set for the block (the job's variables, as the checks should see them)."""
    saved = {k: os.environ.get(k) for k in overlay}
    os.environ.update(overlay)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def data_checks(cfg, cluster: dict[str, Any], spans: bool, command: str = "train", where: str = "here",
                restart: bool = False) -> list[Check]:
    """Shared storage for runs that span nodes, the sweep's own plan checks (tune), then the training driver's
    preflight (distrain.train.preflight), as seen from here. Run wherever local paths mean what they mean to the
    job (this machine, or the head node)."""
    from distrain.train.preflight import PreflightError, check_cluster, check_local
    from distrain.train.run import absolute_paths, run_dir_of

    checks = []
    for key in ("scaling.storage_path", "data.shards"):
        path = cfg.get(key)
        if spans and not storage.shared(path):
            checks.append(Check("storage", "fail", storage.node_local_message(key, path, max(2, cluster.get(
                "nodes", 2))), where))
    if any(c.status == "fail" for c in checks):
        return checks
    if spans:
        checks.append(Check("storage", "ok", "storage and shards are shared (remote URLs or shared mounts)", where))
    cfg = absolute_paths(cfg)
    run_dir = run_dir_of(cfg)
    try:
        if command == "tune":
            from distrain.config import ConfigError
            from distrain.tune.space import num_grid_points, parse_space
            from distrain.tune.sweep import SweepError, check_plan, preflight_sweep, sweep_dir_of

            try:
                space = parse_space(cfg)
                check_plan(cfg, space)
                run_dir = sweep_dir_of(cfg)
                preflight_sweep(cfg, space, run_dir, restart)
            except (ConfigError, SweepError) as e:
                checks.append(Check("sweep", "fail", str(e), where))
                return checks
            total = cfg.tune.num_samples * num_grid_points(space)
            checks.append(Check("sweep", "ok", f"{total} trial(s) over {', '.join(space) or 'no keys'} "
                                               f"({cfg.tune.search_alg} search, {cfg.tune.scheduler} scheduler)",
                                where))
            from distrain.shards.manifest import load_manifest

            facts = {"manifest": load_manifest(cfg.data.shards), "run_dir": f"{run_dir}/runs"}  # trials' folders
        else:
            facts = check_local(cfg, run_dir, restart=restart)
        check_cluster(cfg, cluster, facts)
    except PreflightError as e:
        checks.append(Check("data", "fail", str(e), where))
        return checks
    m = facts["manifest"]
    shards = len(m.shard_urls(cfg.data.train_split))
    readers = cfg.scaling.num_workers * max(1, cfg.data.loader_workers)
    detail = (f"{m.num_samples(cfg.data.train_split):,} train samples in {shards} shard(s), "
              f"{m.num_classes} classes; run folder {facts['run_dir']} writable")
    checks.append(Check("data", "ok", detail, where))
    if shards < readers:
        checks.append(Check("shards", "warn", f"{shards} shard(s) for {cfg.scaling.num_workers} workers × "
                                              f"{max(1, cfg.data.loader_workers)} loader workers = {readers} "
                                              f"readers: readers share shards (sample ranges), which works but "
                                              f"reads less sequentially; rebuild with a smaller --shard-size for "
                                              f"throughput", where))
    return checks


def format_checks(plan, env_source: str) -> str:
    import shlex

    head = (f"checks for `distrain {shlex.join(plan.argv)}` on {plan.cluster.address} "
            f"({plan.cluster.describe()}); runtime env: {env_source}")
    lines = [head]
    for c in plan.checks:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[c.status]
        where = " (on the cluster)" if c.where == "cluster" else ""
        lines.append(f"  {mark} {c.name:<11} {c.detail}{where}")
    return "\n".join(lines)
