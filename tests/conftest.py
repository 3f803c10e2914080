"""Shared test set-up: a loopback-only environment, one Ray cluster per session, generated images and shards.

Real parts only: tests start a real local Ray cluster, write real JPEG/PNG files and real tar shards, and log real
W&B offline runs. Ray starts once per session (`ray_cluster`), since a start costs ~8 s on a 2-core machine.
Helper functions are in tests/helpers.py, the multi-process cluster harness in tests/cluster_harness.py, and the
W&B offline-record decoder in tests/wandb_offline.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from distrain import runtime
from tests.helpers import ROOT, make_image_folder

# Before anything imports Ray or W&B: keep every connection on this machine.
_HOME = Path(tempfile.mkdtemp(prefix="distrain-test-home-"))
# Tests wait less for Ray Train's controller (it notices a finished run sooner) and start no preemption watcher (no
# spot nodes here): seconds off every one of the suite's Ray Train runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
runtime.quiet_ray_env()
runtime.isolated_home(_HOME)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
for _var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
    os.environ.pop(_var, None)
# Workers started by Ray must import the package under test (and tests.*) from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) shared by every test that asks for it."""
    ray = runtime.connect(num_cpus=2, object_store_gb=1.0, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of a learnable 3-class set (40 px JPEGs, 48 per class → ~120 train / ~21 val), built once."""
    from distrain.shards.build import BuildOptions, build_shards

    root = tmp_path_factory.mktemp("tiny")
    make_image_folder(root / "images", num_classes=3, per_class=48, size=40, seed=1)
    out = root / "shards"
    build_shards(str(root / "images"), str(out), BuildOptions(shard_size=24, workers=1, val_fraction=0.15))
    return out


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tiny_shards, tmp_path_factory):
    """One real 2-worker, 2-epoch Ray Train run on `tiny_shards`, shared by the training and inference tests:
    (its config, its summary)."""
    from distrain.config import load_config
    from distrain.train import fit
    from tests.helpers import fast_train_overrides

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, fast_train_overrides(tiny_shards, storage, name="two_workers"))
    return cfg, fit(cfg)
