"""Experiment tracking with Weights & Biases: one W&B run per training run or Tune trial, logged from rank 0.

Usage (the training loop calls this on every rank; ranks other than 0 get a tracker that does nothing):
    tracker = start_tracker(cfg, run_name="run", job_type="train", group=None, rank=rank, run_dir=run_dir)
    tracker.log_step(step, {"train/loss": 0.4, "train/lr": 1e-3, "train/images_per_s": 400, "epoch": 0.5})
    tracker.log_epoch(epoch, metrics, confusion, class_names, misclassified)
    tracker.finish({"best_val_top1": 0.91, "best_epoch": 3})

Driver side:
    log_model_artifact(cfg, run_name, model_dir, run_dir=run_dir)  # uploads model/ when wandb.log_model
    hint = sync_hint(cfg, run_dir)                                  # offline: where the run is, `wandb sync ...`
    log_sweep_summary(cfg, sweep_name, rows, best, sweep_dir)       # distrain/tune: the trial table, one run
    read_offline_run(offline_runs(wandb_dir(cfg, run_dir))[0])      # what an offline run holds, before syncing

Modes (`wandb.mode`): `auto` is online when WANDB_API_KEY is set and offline when it is not (WANDB_MODE or
WANDB_DISABLED in the environment override that guess); `online`, `offline` and `disabled` force it. The API key
is only ever read from the environment, by wandb itself, and the config logged to W&B is scrubbed of anything
that looks like a credential (URL user-info, token-like query parameters, values of secret environment variables).

The run id is derived from project + run folder, so a resumed (or restarted-after-failure) run continues the same
W&B run (resume="allow"). Steps are logged against their own x-axes (`train/step` for per-step metrics, `epoch` for
per-epoch ones) rather than W&B's internal step, so a resumed run that logs step 101 again after step 140 is kept,
not dropped as out of order.

Files: W&B writes `<run_dir>/wandb/` (or `<wandb.dir>/wandb/`); a run folder on s3:// or gs:// gets a local folder
under ~/.cache/distrain/wandb/ instead, announced at start. WANDB_DATA_DIR (where wandb stages table images until
they are uploaded) points into the same folder, so an offline run is self-contained there.

Failure policy: W&B trouble never costs a training run. If W&B cannot start (bad key, no network, init timeout)
the run warns once and continues untracked; if any logging call raises, it warns once and tracking is off for
the rest of the run. `finish` is idempotent and never raises.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Confusion matrices above this many cells keep only their non-zero cells (wandb.Table holds 10,000 rows at most).
MAX_TABLE_ROWS = 10_000
# Up to this many classes, per-class accuracy is logged as one chartable scalar per class; above, as a table.
MAX_PER_CLASS_SCALARS = 100

_SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SECRET_PARAM = r"[^=&;#\s]*(?:key|secret|token|password|passwd|signature|sig|credential|auth)[^=&;#\s]*"
_REDACTED = "<redacted>"


def _say(message: str, stream=None) -> None:
    # Not print(): Ray Train patches it in workers and, once wandb has wrapped a stream, emits each line twice.
    stream = stream or sys.stdout
    stream.write(f"[distrain] {message}\n")
    stream.flush()


def _warn(message: str) -> None:
    _say(f"warning: {message}", sys.stderr)


# ------------------------------------------------------------------------------------------------ mode, id, dirs


def resolve_mode(cfg, environ: dict | None = None) -> str:
    """'online', 'offline' or 'disabled' for this process, from `wandb.mode` and the environment."""
    env = os.environ if environ is None else environ
    mode = cfg.wandb.mode
    if mode != "auto":
        return mode
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env_mode = env.get("WANDB_MODE", "").lower()
    env_mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if env.get("WANDB_API_KEY") else "offline"


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit].strip("-")


def run_id(project: str, key: str) -> str:
    """A W&B run id that is the same every time for the same project and run folder (or name).

    Readable (the run folder's last part) and unique (a hash of the whole key); only the characters W&B allows.
    """
    digest = hashlib.sha256(f"{project}\n{key}".encode()).hexdigest()[:12]
    slug = _slug(key.rstrip("/").rsplit("/", 1)[-1])
    return f"{slug}-{digest}" if slug else digest


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path.removeprefix("file://")


def _default_run_dir(cfg, run_name: str) -> str:
    return cfg.scaling.storage_path.rstrip("/") + "/" + run_name


def wandb_root(cfg, run_dir: str) -> str:
    """The folder handed to wandb.init(dir=...): W&B writes `<this>/wandb/` (see the module docstring)."""
    chosen = cfg.wandb.dir or run_dir
    if not _is_remote(chosen):
        return os.path.abspath(os.path.expanduser(_local(chosen)))
    # W&B can only write to a local disk: a remote folder gets a local one named after the W&B run.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(cache / "distrain" / "wandb" / run_id(cfg.wandb.project, run_dir))


def wandb_dir(cfg, run_dir: str) -> str:
    """Where W&B files of the run in `run_dir` end up (`offline-run-*` folders, logs)."""
    return os.path.join(wandb_root(cfg, run_dir), "wandb")


def offline_runs(path: str | Path, run_id: str | None = None) -> list[Path]:
    """The offline run folders in a W&B folder (or in the folder holding it), oldest first; only those of one
    W&B run when `run_id` is given (a shared `wandb.dir` holds the folders of many runs)."""
    base = Path(path)
    found = sorted(base.glob("offline-run-*")) or sorted(base.glob("wandb/offline-run-*"))
    return [p for p in found if p.is_dir() and (run_id is None or (p / f"run-{run_id}.wandb").exists())]


def sync_hint(cfg, run_dir: str) -> str | None:
    """For the driver at the end of a run: where its offline W&B data is and the command that uploads it."""
    runs = offline_runs(wandb_dir(cfg, run_dir), run_id(cfg.wandb.project, run_dir))
    if not runs:
        return None
    return f"W&B: {len(runs)} offline run folder(s) in {runs[0].parent}; upload with: {sync_command(runs)}"


def sync_command(runs: list[str | Path] | str | Path | None) -> str | None:
    """The command that uploads offline runs (`wandb sync ...`), or None when there is nothing to sync."""
    if runs is None:
        return None
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        return None
    return "wandb sync " + " ".join(shlex.quote(str(r)) for r in runs)


# ------------------------------------------------------------------------------------------------ redaction


def _secret_values(environ: dict | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    values = [v for k, v in env.items() if _SECRET_ENV_NAME.search(k) and len(v) >= 8]
    return sorted(set(values), key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` with credentials removed: URL user-info, token-like query parameters, secret env values."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, _REDACTED)
        value = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@", rf"\1{_REDACTED}@", value)
        return re.sub(rf"([?&;])({_SECRET_PARAM})=[^&;#\s]*", rf"\1\2={_REDACTED}", value, flags=re.IGNORECASE)
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def run_config(cfg, **extra: Any) -> dict[str, Any]:
    """The resolved config, flattened to dotted keys and scrubbed, as W&B shows it."""
    secrets = _secret_values()
    flat = {k: redact(v, secrets) for k, v in cfg.flat().items()}
    flat.update({f"distrain.{k}": redact(v, secrets) for k, v in extra.items() if v is not None})
    return flat


# ------------------------------------------------------------------------------------------------ starting W&B


def _init(cfg, *, name: str, key: str, job_type: str, group: str | None, mode: str, config: dict | None,
          tags: list[str] | None = None):
    """wandb.init with distrain's conventions; returns (run, env var restorer). Raises on any failure."""
    import wandb

    root = wandb_root(cfg, key)
    Path(root, "wandb").mkdir(parents=True, exist_ok=True)
    # Mode and server go in the environment as well as into wandb.init: wandb's process-wide parts (its own error
    # telemetry) read them from there, and an offline run would otherwise still reach for the W&B cloud. Staged
    # table images stay with the run (see module docstring) unless the user chose a data dir.
    scoped = {"WANDB_MODE": mode}
    if cfg.wandb.base_url:
        scoped["WANDB_BASE_URL"] = cfg.wandb.base_url
    if not os.environ.get("WANDB_DATA_DIR"):
        scoped["WANDB_DATA_DIR"] = os.path.join(root, "wandb", "data")
    previous = {k: os.environ.get(k) for k in scoped}
    os.environ.update(scoped)

    def restore() -> None:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    settings: dict[str, Any] = {"init_timeout": cfg.wandb.init_timeout, "reinit": "create_new",
                                "save_code": False, "finish_timeout": cfg.wandb.finish_timeout}
    if cfg.wandb.base_url:
        settings["base_url"] = cfg.wandb.base_url
    try:
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None,
                         id=run_id(cfg.wandb.project, key), name=name, resume="allow", dir=root, mode=mode,
                         group=group or None, job_type=job_type, tags=[str(t)[:64] for t in tags or []] or None,
                         config=config, settings=wandb.Settings(**settings))
    except BaseException:
        restore()
        raise
    return run, restore


def _offline_folder(run) -> str | None:
    try:
        return str(run.settings.sync_dir) if run.settings.mode == "offline" else None
    except Exception:  # only informative
        return None


def start_tracker(cfg, run_name: str, job_type: str = "train", group: str | None = None, rank: int = 0,
                  run_dir: str | None = None) -> Tracker:
    """A W&B-backed tracker on rank 0 (when W&B is on and starts), a no-op tracker everywhere else."""
    if rank != 0:
        return Tracker()
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return Tracker()
    run_dir = run_dir or _default_run_dir(cfg, run_name)
    chosen = cfg.wandb.dir or run_dir
    if _is_remote(chosen):
        _say(f"W&B files of {run_dir} go to the local folder {wandb_dir(cfg, run_dir)} "
             f"(W&B cannot write to {chosen.split('://', 1)[0]}://)")
    try:
        run, restore = _init(cfg, name=run_name, key=run_dir, job_type=job_type, group=group, mode=mode,
                             config=run_config(cfg, run_name=run_name, run_dir=run_dir), tags=cfg.train.tags)
    except Exception as e:  # W&B trouble of any kind must not cost the run
        _warn(f"W&B could not start ({type(e).__name__}: {_first_line(e)}); training continues without "
              f"tracking (wandb.mode={cfg.wandb.mode}, resolved to {mode})")
        return Tracker()
    tracker = WandbTracker(run, cfg, restore)
    tracker._guard("set-up", tracker._define_metrics)
    return tracker


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------------------------------ trackers


class Tracker:
    """Does nothing: the tracker of non-zero ranks and of runs without W&B."""

    enabled = False
    sync_command: str | None = None
    offline_dir: str | None = None

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, Any], confusion=None, class_names=None,
                  misclassified=None) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


class WandbTracker(Tracker):
    """Logs to one live W&B run; the first failure turns it into a no-op for the rest of the run."""

    def __init__(self, run, cfg, restore_env=None):
        self.run, self.cfg = run, cfg
        self.enabled, self._finished, self._warned = True, False, False
        self._restore_env = restore_env or (lambda: None)
        self.best: dict[str, Any] = {}
        self.offline_dir = _offline_folder(run)
        self.sync_command = sync_command(self.offline_dir)

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # see the failure policy in the module docstring
            self.enabled = False
            self._warn_once(f"W&B {what} failed ({type(e).__name__}: {_first_line(e)}); tracking is off for the "
                            f"rest of this run, training continues")

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            _warn(message)

    def _define_metrics(self) -> None:
        # Own x-axes instead of W&B's internal step: see the module docstring (resumed runs).
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("epoch")
        self.run.define_metric("val/*", step_metric="epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    # -------------------------------------------------------------------------------------------- logging

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row: dict[str, Any] = {"train/step": step}
        for key, value in metrics.items():
            row["train/epoch" if key == "epoch" else key] = value
        self._guard("log", self.run.log, row)

    def log_epoch(self, epoch: int, metrics: dict[str, Any], confusion=None, class_names=None,
                  misclassified=None) -> None:
        if self.enabled:
            self._guard("log", self._log_epoch, epoch, metrics, confusion, class_names, misclassified)

    def _log_epoch(self, epoch, metrics, confusion, class_names, misclassified) -> None:
        import wandb

        names = [str(c) for c in class_names] if class_names is not None else None
        row: dict[str, Any] = {"epoch": epoch}
        for key, value in metrics.items():
            if key == "epoch":
                continue
            if key == "val_per_class_acc" and isinstance(value, dict):
                if len(value) <= MAX_PER_CLASS_SCALARS:
                    row.update({f"val/per_class_acc/{name}": acc for name, acc in value.items()})
                else:
                    row["val/per_class_acc"] = wandb.Table(columns=["class", "accuracy"],
                                                           data=[[str(n), float(a)] for n, a in value.items()])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"] = value
        if confusion is not None and len(confusion):
            row["val/confusion_matrix"] = confusion_chart(confusion, names, title=f"Confusion matrix, epoch {epoch}")
        cap = self.cfg.wandb.max_misclassified
        if misclassified and cap > 0:
            row["val/misclassified"] = misclassified_table(misclassified[:cap], names)
        self.run.log(row)

        top1 = metrics.get("val_top1")
        if isinstance(top1, (int, float)) and math.isfinite(top1) and top1 > self.best.get("best_val_top1", -1.0):
            self.best = {"best_val_top1": top1, "best_epoch": epoch}
            for key in ("val_top5", "val_loss"):
                if isinstance(metrics.get(key), (int, float)):
                    self.best[f"best_{key}"] = metrics[key]
            self.run.summary.update(self.best)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        failed = bool(summary) and summary.get("status", "ok") != "ok"  # "failed", or "nan" (stopped)
        if summary and self.enabled:
            values = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, dict))}
            self._guard("summary", self.run.summary.update, values)
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # finishing must never raise
            self._warn_once(f"W&B finish failed ({type(e).__name__}: {_first_line(e)})")
        finally:
            self.enabled = False
            self._restore_env()
        if self.sync_command:
            _say(f"W&B offline run saved in {self.offline_dir}; upload it with: {self.sync_command}")


# ------------------------------------------------------------------------------------------------ W&B objects


def confusion_chart(confusion, class_names: list[str] | None = None, title: str = "Confusion matrix"):
    """W&B's confusion-matrix chart from a count matrix (rows = true class, columns = predicted)."""
    import wandb

    n = len(confusion)
    names = class_names or [f"class_{i}" for i in range(n)]
    cells = [[names[i], names[j], int(confusion[i][j])] for i in range(n) for j in range(n)]
    if len(cells) > MAX_TABLE_ROWS:  # large label sets: the non-zero cells, biggest first
        cells = sorted((c for c in cells if c[2]), key=lambda c: -c[2])[:MAX_TABLE_ROWS]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
    return wandb.plot_table("wandb/confusion_matrix/v1", table,
                            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                            {"title": title})


def _as_image(array):
    import numpy as np

    img = np.asarray(array)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)  # CHW from a loader that did not transpose
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return img


def misclassified_table(rows, class_names: list[str] | None = None):
    """The table of misclassified validation images, most confident mistakes first."""
    import wandb

    def name(i: int) -> str:
        return class_names[i] if class_names and 0 <= i < len(class_names) else str(i)

    table = wandb.Table(columns=["image", "key", "true", "predicted", "confidence"])
    for confidence, key, image, true, pred in sorted(rows, key=lambda r: -r[0]):
        caption = f"true {name(int(true))}, predicted {name(int(pred))} ({float(confidence):.2f})"
        table.add_data(wandb.Image(_as_image(image), caption=caption), str(key), name(int(true)), name(int(pred)),
                       float(confidence))
    return table


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def _cell_type(values: list) -> type:
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int, bool}:
        return int if int in kinds else bool
    if kinds and kinds <= {int, float}:
        return float
    return str


def trials_table(rows: list[dict[str, Any]]):
    """A wandb.Table with one row per trial; columns are the union of the rows' (flattened) keys."""
    import wandb

    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns.extend(k for k in r if k not in columns)
    types = {c: _cell_type([_cell(r.get(c)) for r in flat]) for c in columns}
    data = []
    for r in flat:
        line = []
        for c in columns:
            v = _cell(r.get(c))
            line.append(v if v is None or types[c] is not str else str(v))
        data.append(line)
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


# ------------------------------------------------------------------------------------------------ one-shot runs


def log_sweep_summary(cfg, sweep_name: str, rows: list[dict], best: dict, sweep_dir: str) -> None:
    """One W&B run (job_type "sweep", group = the sweep) holding the trial table and the best trial."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return
    try:
        run, restore = _init(cfg, name=sweep_name, key=sweep_dir, job_type="sweep", group=sweep_name, mode=mode,
                             config=run_config(cfg, sweep_dir=sweep_dir), tags=cfg.train.tags)
    except Exception as e:  # W&B trouble must not cost the sweep
        _warn(f"W&B could not start for the sweep summary ({type(e).__name__}: {_first_line(e)}); skipped")
        return
    tracker = WandbTracker(run, cfg, restore)
    tracker._guard("sweep summary", _log_sweep, run, rows, best)
    tracker.finish()


def _log_sweep(run, rows, best) -> None:
    run.log({"sweep/trials": trials_table(rows)})
    summary = {"num_trials": len(rows)}
    summary.update({f"best/{k}": _cell(v) for k, v in _flatten(best or {}).items()})
    run.summary.update(summary)


def log_model_artifact(cfg, run_name: str, model_dir: str, run_dir: str | None = None, job_type: str = "train",
                       group: str | None = None) -> str | None:
    """Upload `model_dir` as a W&B model artifact of the run's W&B run (resumed by its id) when wandb.log_model.

    Returns the artifact name, or None when not logged. Call it on the driver after model/ is written.
    """
    if not cfg.wandb.log_model:
        return None
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    run_dir = run_dir or _default_run_dir(cfg, run_name)
    try:
        run, restore = _init(cfg, name=run_name, key=run_dir, job_type=job_type, group=group, mode=mode,
                             config=None, tags=cfg.train.tags)
    except Exception as e:
        _warn(f"W&B could not start to upload {model_dir} ({type(e).__name__}: {_first_line(e)}); skipped")
        return None
    tracker = WandbTracker(run, cfg, restore)
    name = f"{_slug(run_name) or 'model'}-model"
    tracker._guard("model upload", _log_model, run, name, model_dir, run_name)
    ok = tracker.enabled
    tracker.finish()
    return name if ok else None


def _log_model(run, name: str, model_dir: str, run_name: str) -> None:
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata={"run": run_name, "source": redact(model_dir)})
    if _is_remote(model_dir):
        import fsspec

        fs, path = fsspec.core.url_to_fs(model_dir)
        with tempfile.TemporaryDirectory(prefix="distrain-model-") as tmp:
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            artifact.add_dir(tmp)  # files are copied to W&B's staging area here, so tmp may go
    else:
        artifact.add_dir(_local(model_dir))
    run.log_artifact(artifact, aliases=["latest", "best"])


# ------------------------------------------------------------------------------------------------ reading back


@dataclass
class OfflineRun:
    """What an offline run folder holds, decoded from its `run-<id>.wandb` record log."""

    path: Path
    run: dict[str, Any] = field(default_factory=dict)  # id, project, group, job_type, tags, name
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # type, name, files {path: local file}
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def table(self, path: str) -> dict:
        """A logged table's JSON (`files/<path>`), e.g. the `path` of a history value of type table-file."""
        return json.loads((self.path / "files" / path).read_text())


def _records(path: Path):
    """Records of a W&B `.wandb` file: a LevelDB-style log of 32 KiB blocks holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run log (header {data[:7]!r})")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += block - pos % block if pos % block else 0
            continue
        if pos + length > len(data):  # a record still being written
            return
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _item_value(item) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    # History items may carry a typed value instead of JSON.
    which = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    return None if which in (None, "none") else getattr(item, which)


def _item_key(item) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_nested(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def read_offline_run(path: str | Path, wait_s: float = 0.0) -> OfflineRun:
    """Decode an offline run folder (`offline-run-*`) or its `.wandb` file: config, history, summary, artifacts.

    wandb's core process writes the file in the background and may still be at it for a moment after
    `run.finish()` returns: `wait_s` waits up to that long for the run's exit record (`exit_code` stays None for
    a run that is still going, or that crashed).
    """
    path = Path(path)
    log = path if path.suffix == ".wandb" else next(iter(sorted(path.glob("run-*.wandb"))), None)
    if log is None:
        raise FileNotFoundError(f"{path}: no run-*.wandb file (not a W&B run folder?)")
    deadline = time.monotonic() + wait_s
    while True:
        out = _decode(log)
        if out.exit_code is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _decode(log: Path) -> OfflineRun:
    out = OfflineRun(path=log.parent)
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.run = {"id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group,
                       "job_type": r.job_type, "tags": list(r.tags), "name": r.display_name}
            for item in r.config.update:
                _set_nested(out.config, _item_key(item), _item_value(item))
        elif kind == "config":
            for item in record.config.update:
                _set_nested(out.config, _item_key(item), _item_value(item))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, _item_key(item), _item_value(item))
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(out.summary, _item_key(item), _item_value(item))
        elif kind == "artifact":
            a = record.artifact
            out.artifacts.append({"type": a.type, "name": a.name, "files": {
                e.path: e.local_path for e in a.manifest.contents}})
        elif kind == "files":
            out.files.extend(f.path for f in record.files.files)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out
