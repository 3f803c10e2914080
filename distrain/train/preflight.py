"""Everything about a training run that can fail before any worker starts, checked on the driver in seconds.

Usage:
    from distrain.train.preflight import PreflightError, check_local, check_cluster
    facts = check_local(cfg, run_dir, restart=False)    # shards, model skeleton, weights, checkpoint, storage
    check_cluster(cfg, cluster, facts)                  # node-local storage on several nodes, workers that fit

Why so much up front: a failure after the ~30 s worker start-up (or after an autoscaler bought GPU nodes), retried
`train.max_failures` times in every worker, or a hang at a collective, is the expensive kind. So the driver builds the
model skeleton itself (random init, no download: an unknown backbone, a head that does not fit, an unfreeze depth
beyond the backbone's stages in any phase fail here), checks that the weights can be had (installed package,
readable file, cached or reachable hub), that the shards hold a full batch for every rank, that an existing checkpoint
was trained on the same classes and backbone, and that the storage is writable. `distrain submit` runs the same
checks before it uploads anything.
"""

from __future__ import annotations

import os
from typing import Any

from distrain import storage
from distrain.train import placement
from distrain.train.errors import PreflightError


def check_shards(cfg) -> Any:
    """The manifest, its splits, its first and last shards, and a full batch for every rank."""
    from distrain.data import check_shards as plan_check
    from distrain.data.sources import DataError
    from distrain.shards.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(cfg.data.shards)
        for split in (cfg.data.train_split, cfg.data.val_split):
            manifest.split(split)
    except ManifestError as e:
        raise PreflightError(f"data.shards: {e}") from None
    for split in (cfg.data.train_split, cfg.data.val_split):
        urls = manifest.shard_urls(split)
        if not urls:
            raise PreflightError(f"{manifest.location}: split '{split}' has no shards")
        for url in (urls[0], urls[-1]):  # cheap: first and last; the loader checks all at start
            if not storage.exists(url):
                raise PreflightError(f"shard {url} named by {manifest.location}/manifest.json does not exist")
    try:
        plan_check(manifest, cfg.data.train_split, world_size=cfg.scaling.num_workers,
                   loader_workers=cfg.data.loader_workers, batch_size=cfg.data.batch_size, limit=cfg.data.train_limit)
    except (ValueError, DataError) as e:
        raise PreflightError(str(e)) from None
    return manifest


def check_model(cfg, classes: list[str]):
    """Build the model skeleton (no weights) and check every phase's depth and the weights' availability."""
    from distrain.models import ModelError, ModelSpec, create_model
    from distrain.models.availability import check_weights
    from distrain.train.core import phases

    spec = ModelSpec.from_config(cfg.model, classes, cfg.data.image_size)
    try:
        skeleton = create_model(spec.replace(weights="none", unfreeze_depth=0))
    except ModelError as e:
        raise PreflightError(f"model.backbone={cfg.model.backbone}: {e}") from None
    for phase in phases(cfg):
        depth = phase.cfg.model.unfreeze_depth
        try:
            skeleton.resolve_depth(depth)
        except ModelError as e:
            where = f"train.phases[{phase.index}] (phase {phase.index + 1})" if cfg.train.phases else "model"
            raise PreflightError(f"{where}: unfreeze_depth: {e}") from None
    try:
        source = check_weights(cfg.model.backbone, cfg.model.weights)
    except ModelError as e:
        raise PreflightError(f"model.weights={cfg.model.weights}: {e}") from None
    return skeleton.spec.replace(weights=cfg.model.weights), source


def check_local(cfg, run_dir: str, restart: bool = False) -> dict[str, Any]:
    """The checks that need no cluster. Returns the facts the run needs (manifest, spec)."""
    from distrain.train import checkpoint

    manifest = check_shards(cfg)
    spec, weights_source = check_model(cfg, list(manifest.classes))
    if restart:
        marker = storage.owner(run_dir)
        if storage.exists(run_dir) and marker is None and not storage.is_empty(run_dir) \
                and not looks_like_run(run_dir):
            raise PreflightError(f"--restart: {run_dir} exists but distrain did not create it (no "
                                 f"{storage.MARKER} in it): nothing was deleted; move it away or choose another "
                                 f"train.name / scaling.storage_path")
    else:
        if storage.exists(run_dir) and storage.owner(run_dir) is None and not storage.is_empty(run_dir) \
                and not looks_like_run(run_dir):
            raise PreflightError(f"{run_dir} exists and holds files distrain did not write: choose another "
                                 f"train.name or scaling.storage_path (distrain writes only into its own folders)")
        last = checkpoint.latest(run_dir)
        if last:
            try:
                checkpoint.check_compatible(last, list(manifest.classes), spec, data_name=cfg.data.shards)
            except checkpoint.CheckpointError as e:
                raise PreflightError(str(e)) from None
    if cfg.train.init_from:
        start = cfg.train.init_from
        if not storage.exists(storage.join(start, checkpoint.META)):
            raise PreflightError(f"train.init_from={start}: no distrain checkpoint there ({checkpoint.META} missing)")
        try:
            checkpoint.check_compatible(start, list(manifest.classes), spec, data_name=cfg.data.shards)
        except checkpoint.CheckpointError as e:
            raise PreflightError(f"train.init_from: {e}") from None
    try:
        storage.check_writable(run_dir)
    except storage.StorageError as e:
        raise PreflightError(f"scaling.storage_path: {e}") from None
    return {"manifest": manifest, "spec": spec, "weights_source": weights_source, "run_dir": run_dir}


def looks_like_run(folder: str) -> bool:
    """A run folder of a distrain release without ownership markers: its config and Ray's checkpoint record."""
    return storage.exists(storage.join(folder, "config.yaml")) and \
        storage.exists(storage.join(folder, "checkpoint_manager_snapshot.json"))


def check_cluster(cfg, cluster: dict[str, Any], facts: dict[str, Any] | None = None,
                  nodes: list[dict] | None = None) -> dict[str, Any]:
    """The checks against the cluster: storage every node sees when there are several, and workers that fit (a
    local cluster cannot grow, so too many is an error; an autoscaling one may add nodes). Returns placement facts."""
    facts = dict(facts or {})
    root = storage.absolute(cfg.scaling.storage_path)
    if cluster.get("nodes", 1) > 1 and not storage.shared(root):
        raise PreflightError(storage.node_local_message("scaling.storage_path", cfg.scaling.storage_path,
                                                        cluster["nodes"]))
    gpu = placement.use_gpu(cfg, cluster)
    if cluster and not os.environ.get("RAY_ADDRESS"):
        problem = placement.check_fits(cfg, cluster, nodes)
        if problem:
            raise PreflightError(problem + ": lower scaling.num_workers or data.loader_workers, or set "
                                           "scaling.cpus_per_worker")
    if cfg.data.engine == "ray_data":
        check_ray_data(cfg, cluster)
    if cfg.data.decode == "gpu" and not gpu:
        raise PreflightError("data.decode=gpu decodes on the training GPU, but these workers get none "
                             f"(scaling.use_gpu={cfg.scaling.use_gpu}, cluster GPUs: {cluster.get('GPU', 0):g}): "
                             "use data.decode=auto or cpu")
    facts.update(use_gpu=gpu, resources=placement.worker_resources(cfg, gpu))
    return facts


def check_ray_data(cfg, cluster: dict[str, Any]) -> None:
    """data.engine=ray_data: the Ray APIs it uses, CPU decoding, the data nodes' label and CPUs (before any worker)."""
    from distrain.data.ray_data import check_api

    problem = check_api()
    if problem:
        raise PreflightError(problem)
    if cfg.data.decode == "gpu":
        raise PreflightError("data.decode=gpu decodes on the training GPU, but data.engine=ray_data decodes in Ray "
                             "Data tasks on CPUs: use data.decode=auto or cpu, or data.engine=loader")
    import ray

    nodes = [{**n["Resources"], "labels": n.get("Labels") or {}} for n in ray.nodes() if n.get("Alive")]
    problem = placement.data_cpus_problem(cfg, cluster, nodes)
    if problem:
        raise PreflightError(problem)


def preflight(cfg, cluster: dict[str, Any], restart: bool = False) -> dict[str, Any]:
    """Every check, local and against `cluster` (a summary: nodes, CPU, GPU), for the run `cfg` describes."""
    cfg = storage.absolute_paths(cfg)
    facts = check_local(cfg, storage.run_folder(cfg), restart=restart)
    return check_cluster(cfg, cluster, facts)
