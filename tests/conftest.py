"""Shared test set-up: a loopback-only environment, one Ray cluster per session, generated image folders.

Real parts only: tests start a real local Ray cluster, write real JPEG/PNG files and real tar shards, and log real
W&B offline runs. Ray starts once per session (`ray_cluster`), since a start costs ~8 s on a 2-core machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrain import runtime

# Before anything imports Ray or W&B: keep every connection on this machine.
_HOME = Path(tempfile.mkdtemp(prefix="distrain-test-home-"))
runtime.quiet_ray_env()
runtime.isolated_home(_HOME)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
# Workers started by Ray must import the package under test from this checkout.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) shared by every test that asks for it."""
    ray = runtime.connect(num_cpus=2, object_store_gb=1.0, log_to_driver=True)
    yield ray
    ray.shutdown()


# Distinct, easily separable class colours: a small CNN learns them in a few steps from any init.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 210, 210)]


def learnable_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy image whose class is its dominant colour and the orientation of its stripes."""
    base = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    stripes = (np.arange(size) // max(1, size // 8)) % 2
    mask = stripes[None, :] if label % 2 == 0 else stripes[:, None]
    img *= (0.75 + 0.25 * mask)[..., None]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, num_classes: int = 3, per_class: int = 20, size: int = 48, seed: int = 0,
                      fmt: str = "JPEG") -> Path:
    """An ImageFolder layout (root/<class>/<i>.jpg) of learnable images."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for c in range(num_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            learnable_image(c, size, rng).save(d / f"{i:04d}.{ext}", fmt)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of a learnable 3-class set (40 px JPEGs, 48 per class → ~130 train / ~14 val), built once."""
    from distrain.shards.build import BuildOptions, build_shards

    root = tmp_path_factory.mktemp("tiny")
    make_image_folder(root / "images", num_classes=3, per_class=48, size=40, seed=1)
    out = root / "shards"
    build_shards(str(root / "images"), str(out), BuildOptions(shard_size=24, workers=1, val_fraction=0.15))
    return out


def fast_train_overrides(shards: Path, storage: Path, name: str = "run", **extra) -> dict:
    """Config overrides for a training run that takes ~30 s with 2 workers on 2 CPU cores."""
    overrides = {
        "data.shards": str(shards), "data.image_size": 32, "data.batch_size": 8, "data.loader_workers": 0,
        "data.aug_strength": 0.0, "model.backbone": "mobilenet_v2", "model.unfreeze_depth": 1,
        "optim.lr": 0.003, "optim.warmup_epochs": 0.0, "train.epochs": 2, "train.name": name,
        "train.log_every": 5, "scaling.num_workers": 2, "scaling.storage_path": str(storage),
        "wandb.mode": "disabled",
    }
    overrides.update(extra)
    return overrides
