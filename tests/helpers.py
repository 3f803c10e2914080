"""Helpers the tests share: generated image folders, tiny shards, config overrides for fast runs.

Real parts only: images are real JPEG/PNG files, shards real tar files, and runs real Ray runs; the helpers only
keep them small (40 px images, a few hundred samples, 1-2 epochs) so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent
RAY_PIN = next(d.split("==")[1] for d in
               __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("ray["))  # the Ray version the project pins (deployment files must agree)

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


def fast_train_overrides(shards: Path, storage: Path, name: str = "run", **extra) -> dict:
    """Config overrides for a training run that takes ~15-30 s with 2 workers on 2 CPU cores."""
    overrides = {
        "data.shards": str(shards), "data.image_size": 32, "data.batch_size": 8, "data.loader_workers": 0,
        "data.aug_strength": 0.0, "model.backbone": "mobilenet_v2", "model.unfreeze_depth": 1,
        "optim.lr": 0.003, "optim.warmup_epochs": 0.0, "train.epochs": 2, "train.name": name,
        "train.log_every": 5, "scaling.num_workers": 2, "scaling.storage_path": str(storage),
        "wandb.mode": "disabled",
    }
    overrides.update(extra)
    return overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(out: str) -> dict:
    """The last line of a command's output that is a JSON object."""
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{out[-2000:]}")


def sparse_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # a sparse file: its size counts, no disk is used
