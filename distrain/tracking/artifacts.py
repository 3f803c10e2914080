"""The trained model as a W&B model artifact of its training run (`wandb.log_model`).

Usage:
    from distrain.tracking.artifacts import log_model_artifact
    log_model_artifact(cfg, model_dir, run_dir=run_dir)    # the artifact name, or None when not logged

Call it on the driver after model/ is written: it resumes the run's W&B run (same id, from the run folder) and
adds the folder as a model artifact with aliases `latest` and `best`. A folder on a bucket is fetched to a local
temporary folder first (W&B stages artifact files locally).
"""

from __future__ import annotations

import tempfile

from distrain import storage
from distrain.console import warn
from distrain.redact import redact
from distrain.tracking.run import WandbTracker, _first_line, _init, _slug, resolve_mode


def log_model_artifact(cfg, model_dir: str, run_dir: str) -> str | None:
    """Upload `model_dir` as a W&B model artifact of the run's W&B run when wandb.log_model; the artifact name, or
    None when not logged."""
    if not cfg.wandb.log_model or resolve_mode(cfg) == "disabled":
        return None
    try:
        run, restore = _init(cfg, run_dir=run_dir, config=None)
    except Exception as e:
        warn(f"W&B could not start to upload {model_dir} ({type(e).__name__}: {_first_line(e)}); skipped")
        return None
    tracker = WandbTracker(run, cfg, restore)
    name = f"{_slug(cfg.train.name) or 'model'}-model"
    tracker._guard("model upload", _log_model, run, name, model_dir, cfg.train.name)
    ok = tracker.enabled
    tracker.finish()
    return name if ok else None


def _log_model(run, name: str, model_dir: str, run_name: str) -> None:
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata={"run": run_name, "source": redact(model_dir)})
    if storage.is_remote(model_dir):
        fs, path = storage.fs_of(model_dir)
        with tempfile.TemporaryDirectory(prefix="distrain-model-") as tmp:
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            artifact.add_dir(tmp)  # files are copied to W&B's staging area here, so tmp may go
    else:
        artifact.add_dir(storage.local_path(model_dir))
    run.log_artifact(artifact, aliases=["latest", "best"])
