"""The training checkpoint: its files, finding the latest and the best, resuming, and turning one into model/.

Usage:
    from distrain.train import checkpoint
    checkpoint.write(tmp_dir, model, train_state, meta)          # rank 0, before ray.train.report(checkpoint=...)
    ck = checkpoint.read(path)                                   # Loaded(meta, weights, state); local dir or URL
    checkpoint.restore(model, ck)                                # weights into the model (trainable part or all)
    checkpoint.latest(run_dir)                                   # the checkpoint a rerun resumes from, or None
    checkpoint.kept(run_dir)                                     # [(path, metrics)] of the checkpoints Ray kept
    checkpoint.history(run_dir)                                  # per-epoch metrics, including resumed epochs
    checkpoint.check_compatible(path, classes, spec)             # TrainingError before a mismatched resume
    checkpoint.to_model_dir(path, run_dir + "/model", provenance={...})

Layout of a checkpoint folder (Ray Train stores it as `<run_dir>/checkpoint_epoch_NNNN/`):
    weights.pt        trainable parameters and buffers (the frozen part is named by its source and rebuilt from it),
                      or the whole state dict with model.save_frozen
    train_state.pt    optimizer, scheduler, grad scaler
    meta.json         epoch, step, phase, classes, the ModelSpec, the metric history, the data position, the config
Everything is loaded with `torch.load(weights_only=True)`: a checkpoint cannot run code.

Finding checkpoints uses Ray Train's public `ray.train.Result.from_path` (it reads the run folder's own record of
its checkpoints), so distrain never parses Ray's internal files.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

META = "meta.json"
WEIGHTS = "weights.pt"
STATE = "train_state.pt"
DIR_PREFIX = "checkpoint_epoch_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (other classes or backbone, unreadable files)."""


class CheckpointWriteError(CheckpointError):
    """The run's storage did not take a checkpoint (read-only, full, gone); the message names the last good one."""


@dataclass
class Loaded:
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: str = ""
    init: bool = False  # another run's checkpoint (train.init_from), not this run's own


def dir_name(epoch: int) -> str:
    return f"{DIR_PREFIX}{epoch:04d}"


# --------------------------------------------------------------------------------------------------- writing


def write(folder: str, model, train_state: dict, meta: dict[str, Any], full: bool = False) -> None:
    """Write a checkpoint's three files into the local folder `folder` (which Ray Train then persists)."""
    from distrain.redact import redact

    weights = model.state_dict() if full else model.trainable_state_dict()
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, Path(folder) / WEIGHTS)
    torch.save(train_state, Path(folder) / STATE)
    meta = {**meta, "frozen_included": full, "spec": model.spec.to_dict()}
    (Path(folder) / META).write_text(json.dumps(redact(meta), indent=1, default=str))


# --------------------------------------------------------------------------------------------------- reading


def read(path: str, with_state: bool = True) -> Loaded:
    """A checkpoint folder (local or URL) loaded: meta, weights, and (with_state) optimizer/scheduler state."""
    from distrain.storage import fs_of, is_remote

    if not is_remote(path):
        return _read_local(Path(path), with_state, path)
    fs, fs_path = fs_of(path)
    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-") as tmp:
        for name in (META, WEIGHTS) + ((STATE,) if with_state else ()):
            fs.get(f"{fs_path.rstrip('/')}/{name}", f"{tmp}/{name}")
        return _read_local(Path(tmp), with_state, path)


def _read_local(folder: Path, with_state: bool, name: str) -> Loaded:
    try:
        meta = json.loads((folder / META).read_text())
        weights = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True) if with_state else {}
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {name} is unreadable ({type(e).__name__}: {e})") from None
    return Loaded(meta, weights, state, name)


def restore(model, ck: Loaded) -> None:
    """Load a checkpoint's weights into a model built from the same spec (the trainable part, or everything)."""
    if ck.meta.get("frozen_included"):
        model.load_state_dict(ck.weights)
    else:
        model.load_trainable_state_dict(ck.weights, partial=True)


def spec_of(meta: dict[str, Any]):
    from distrain.models.spec import ModelSpec

    return ModelSpec.from_dict(meta["spec"])


# ----------------------------------------------------------------------------------------------- a run's checkpoints


def _result(run_dir: str):
    """ray.train.Result of a run folder, or None when it holds no checkpoint (or is not a Ray Train run)."""
    from distrain.storage import exists, join

    if not exists(join(run_dir, "checkpoint_manager_snapshot.json")):  # Result.from_path's own precondition
        return None
    import ray.train

    try:
        return ray.train.Result.from_path(run_dir)
    except Exception:  # a snapshot naming a deleted checkpoint, or a folder Ray cannot read: nothing to resume
        return None


def _path(run_dir: str, checkpoint) -> str:
    """The checkpoint's location in the same notation as `run_dir` (a URL stays a URL)."""
    from distrain.storage import is_remote, join

    name = str(checkpoint.path).rstrip("/").rsplit("/", 1)[-1]
    return join(run_dir, name) if is_remote(run_dir) else str(checkpoint.path)


def latest(run_dir: str) -> str | None:
    """The latest checkpoint Ray recorded in a run folder (what a rerun resumes from), or None."""
    result = _result(run_dir)
    if result is None or result.checkpoint is None:
        return None
    return _path(run_dir, result.checkpoint)


def kept(run_dir: str) -> list[tuple[str, dict]]:
    """[(checkpoint path, rank 0's metrics)] of every checkpoint Ray Train kept, in its order."""
    result = _result(run_dir)
    if result is None:
        return []
    return [(_path(run_dir, c), dict(m or {})) for c, m in result.best_checkpoints or []]


def best(run_dir: str, metric: str = "val_top1", mode: str = "max") -> tuple[str, dict] | None:
    """The kept checkpoint with the best `metric` (ties: the earlier epoch), or None."""
    import math

    scored = [(p, m) for p, m in kept(run_dir)
              if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda pm: (sign * pm[1][metric], -pm[1].get("epoch", 0)))


def history(run_dir: str) -> list[dict]:
    """Per-epoch metrics of a run (from its latest checkpoint, so epochs before a resume are included)."""
    path = latest(run_dir)
    if path is None:
        return []
    from distrain.storage import join, read_json

    try:
        meta = read_json(join(path, META))
    except (OSError, ValueError):
        return []
    return [{k: v for k, v in h.items() if k != "val_per_class_acc"} for h in meta.get("history") or []]


def check_compatible(path: str, classes: list[str], spec, data_name: str = "the shards") -> None:
    """Refuse to resume a checkpoint trained on other classes or another backbone (CheckpointError says what)."""
    from distrain.storage import join, read_json

    try:
        meta = read_json(join(path, META))
    except (OSError, ValueError):
        return  # an unreadable meta fails the resume itself, with its own message
    saved = meta.get("spec") or {}
    if list(meta.get("classes") or saved.get("classes") or []) != list(classes):
        n = len(meta.get("classes") or saved.get("classes") or [])
        raise CheckpointError(f"{path} was trained on {n} classes but {data_name} has {len(classes)}: use "
                              f"--restart to start over, or another train.name")
    if saved.get("backbone") and saved["backbone"] != spec.backbone:
        raise CheckpointError(f"{path} holds a {saved['backbone']} model, the config asks for {spec.backbone}: use "
                              f"--restart or another train.name")
    for key in ("head_hidden", "head_pool", "vgg_top", "head_activation"):
        if key in saved and saved[key] != getattr(spec, key):
            raise CheckpointError(f"{path} has model.{key}={saved[key]!r}, the config asks for "
                                  f"{getattr(spec, key)!r}: use --restart or another train.name")


def to_model_dir(path: str, out_dir: str, provenance: dict | None = None) -> str:
    """Rebuild the full model of a checkpoint (frozen part from its source) and write a self-contained model/."""
    from distrain.models import create_model
    from distrain.models.folder import save_model_dir

    ck = read(path, with_state=False)
    spec = spec_of(ck.meta)
    model = create_model(spec.replace(weights="none") if ck.meta.get("frozen_included") else spec)
    restore(model, ck)
    return save_model_dir(model, out_dir, provenance=provenance)
