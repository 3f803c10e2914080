"""Placement: what one training run's workers hold, and whether they fit a cluster (counted per node).

Usage:
    from distrain.train.placement import worker_resources, use_gpu, fits, check_fits, trials_that_fit
    worker_resources(cfg, use_gpu=False)        # {'CPU': 2}
    fits(cfg, nodes=[{'CPU': 2, 'GPU': 0}], use_gpu=False)   # (workers the nodes hold in all, on the largest node)
    check_fits(cfg, cluster)                    # PlacementError naming the need and the cluster, or None
    trials_that_fit(cfg, cluster)               # how many runs' workers fit at once (a sweep's concurrency)

The one arithmetic for "do these workers fit": the training preflight, `distrain submit`'s checks and the sweep
planner all call these functions. A worker cannot straddle two nodes, so capacity is counted node by node.
"""

from __future__ import annotations

import math


class PlacementError(ValueError):
    """Workers that cannot be placed on the cluster, with the numbers."""


def cpus_per_worker(cfg) -> float:
    """scaling.cpus_per_worker resolved: 0 = the worker plus its loader processes (data.engine=loader), or one CPU
    (data.engine=ray_data: decoding runs in Ray Data tasks, which reserve their own)."""
    if cfg.data.engine == "ray_data":
        return float(cfg.scaling.cpus_per_worker or 1)
    return float(cfg.scaling.cpus_per_worker or cfg.data.loader_workers + 1)


def data_cpus_problem(cfg, cluster: dict, nodes: list[dict]) -> str | None:
    """data.engine=ray_data: None when its decode tasks have CPUs to run on, else why not. With a node label they
    run on the labelled nodes only (and the Train workers on the others); without, beside the Train workers."""
    need = cfg.data.ray_data.cpus_per_task
    label = cfg.data.ray_data.node_label
    if label:
        from distrain.data.ray_data import parse_label

        key, value = parse_label(label)
        mine = [n for n in nodes if (n.get("labels") or {}).get(key) == value]
        if not mine:
            seen = sorted({f"{k}={v}" for n in nodes for k, v in (n.get("labels") or {}).items()
                           if not k.startswith("ray.io/")})
            return (f"data.ray_data.node_label={label}: no node of this cluster carries that label (custom labels "
                    f"seen: {', '.join(seen) or 'none'}); start the data nodes with `ray start --labels {label}` "
                    f"(cluster/: the data worker group), or leave the setting empty")
        cpus = sum(n.get("CPU", 0.0) for n in mine)
        if cpus + 1e-9 < need:
            return (f"data.ray_data.cpus_per_task={need:g}, but the nodes labelled {label} have {cpus:g} CPUs in all")
        others = [n for n in nodes if n not in mine]
        total, _ = fits(cfg, others, use_gpu(cfg, cluster))
        if total < cfg.scaling.num_workers:
            return (f"{describe_need(cfg, use_gpu(cfg, cluster))} must keep off the {len(mine)} node(s) labelled "
                    f"{label}, and the other {len(others)} node(s) hold {total} such worker(s)")
        return None
    taken = run_needs(cfg, use_gpu(cfg, cluster))["CPU"]
    if cluster.get("CPU", 0.0) - taken + 1e-9 < need:
        return (f"data.engine=ray_data decodes in Ray Data tasks of {need:g} CPU each (data.ray_data.cpus_per_task), "
                f"but the Train workers reserve {taken:g} of the cluster's {cluster.get('CPU', 0):g} CPUs: lower "
                f"scaling.cpus_per_worker or data.ray_data.cpus_per_task, or add CPU nodes (labelled for data)")
    return None


def use_gpu(cfg, cluster: dict) -> bool:
    """scaling.use_gpu resolved against the cluster (`auto`: GPUs when it has any)."""
    if cfg.scaling.use_gpu == "auto":
        return cluster.get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def worker_resources(cfg, gpu: bool) -> dict[str, float]:
    """What one Ray Train worker reserves (ScalingConfig.resources_per_worker)."""
    out: dict[str, float] = {"CPU": float(cpus_per_worker(cfg))}
    if gpu:
        out["GPU"] = float(cfg.scaling.gpus_per_worker)
    return out


def run_needs(cfg, gpu: bool) -> dict[str, float]:
    """CPUs and GPUs a whole run's workers hold (its driver and controller hold none)."""
    per = worker_resources(cfg, gpu)
    return {k: v * cfg.scaling.num_workers for k, v in per.items()}


def fits(cfg, nodes: list[dict], gpu: bool) -> tuple[int, int]:
    """(workers the nodes hold in total, workers the largest node holds), counted per node."""
    per = worker_resources(cfg, gpu)
    counts = []
    for node in nodes:
        k = 10**6
        for res, need in per.items():
            if need > 0:
                k = min(k, int(node.get(res, 0.0) // need + 1e-9))
        counts.append(k)
    return sum(counts), max(counts, default=0)


def describe_need(cfg, gpu: bool) -> str:
    need = f"{cfg.scaling.num_workers} worker(s) × {cpus_per_worker(cfg):g} CPU"
    return need + (f" + {cfg.scaling.gpus_per_worker:g} GPU" if gpu else "")


def check_fits(cfg, cluster: dict, nodes: list[dict] | None = None) -> str | None:
    """None when the run's workers fit, else why not (per node when `nodes` are known, else in total)."""
    gpu = use_gpu(cfg, cluster)
    world, cpus = cfg.scaling.num_workers, cpus_per_worker(cfg)
    if nodes is None:  # only totals known (a local cluster): compare totals
        if world * cpus > cluster.get("CPU", 0) + 1e-9:
            return (f"{world} workers × {cpus:g} CPUs = {world * cpus:g} CPUs, but this cluster has "
                    f"{cluster.get('CPU', 0):g}")
        if gpu and world * cfg.scaling.gpus_per_worker > cluster.get("GPU", 0) + 1e-9:
            return f"{world} workers × {cfg.scaling.gpus_per_worker:g} GPUs, but this cluster has " \
                   f"{cluster.get('GPU', 0):g}"
        return None
    total, _ = fits(cfg, nodes, gpu)
    if total >= world:
        return None
    have = f"{cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs in {len(nodes)} node(s)"
    return (f"{describe_need(cfg, gpu)} do not fit: the cluster ({have}) holds {total} such worker(s) (counted per "
            f"node; a worker cannot straddle two)")


def trials_that_fit(cfg, cluster: dict) -> int:
    """How many runs of `cfg` the cluster's CPUs (and GPUs) hold at once."""
    need = run_needs(cfg, use_gpu(cfg, cluster))
    return min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
