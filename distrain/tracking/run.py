"""The W&B run of a training run or Tune trial: started on rank 0, logged per step and epoch, finished with a summary.

Usage (the training loop calls this on every rank; ranks other than 0 get a tracker that does nothing):
    tracker = start_tracker(cfg, rank=rank, run_dir=run_dir)
    tracker.log_step(step, {"train/loss": 0.4, "train/lr": 1e-3, "train/images_per_s": 400, "epoch": 0.5})
    tracker.log_epoch(epoch, metrics, confusion, class_names, misclassified)
    tracker.finish({"best_val_top1": 0.91, "best_epoch": 3, "status": "ok"})
    hint = sync_hint(cfg, run_dir)                   # driver: offline runs and the `wandb sync ...` command

Settings follow W&B's own conventions: where the config leaves one at its default (empty, or `auto`), W&B's
environment variables decide exactly as they would for a plain `wandb.init` (WANDB_MODE, WANDB_PROJECT,
WANDB_ENTITY, WANDB_DIR, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_BASE_URL); an explicit config value wins. Mode `auto`
is WANDB_MODE (or WANDB_DISABLED) if set, else online with WANDB_API_KEY and offline without. The API key is only
ever read from the environment, by wandb itself, and the config logged to W&B is redacted (distrain/redact.py).

The run id is derived from the project and the run folder, so a resumed (or restarted-after-failure) run continues
the same W&B run (resume="allow"). Steps are logged against their own x-axes (`train/step` per step, `epoch` per
epoch) rather than W&B's internal step, so a resumed run that logs step 101 again after step 140 is kept.

Files: W&B writes `<WANDB_DIR or wandb.dir or the run folder>/wandb/`; a run folder on s3:// or gs:// gets a local
folder under ~/.cache/distrain/wandb/ instead, announced at start. WANDB_DATA_DIR (where wandb stages table images)
points into the same folder unless set, so an offline run is self-contained there.

Failure policy: W&B trouble never costs a training run. If an online run cannot start (no network, a server that
stalls past wandb.init_timeout) it warns once and logs offline instead, same run id, for `wandb sync` later; if
W&B cannot start at all, it warns once and continues untracked; if any logging call raises, it warns once and
tracking is off for the rest of the run. `finish` is idempotent, bounded by wandb.finish_timeout, never raises.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

from distrain import storage
from distrain.console import say, warn
from distrain.redact import redact, secret_values
from distrain.tracking.charts import MAX_PER_CLASS_SCALARS, confusion_chart, misclassified_table

# W&B's own environment variables that carry settings (not secrets): forwarded to Train workers, which start the run.
WANDB_ENV = ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_GROUP",
             "WANDB_TAGS", "WANDB_BASE_URL", "WANDB_DATA_DIR", "WANDB_SILENT")
DEFAULT_PROJECT = "distrain"


# ------------------------------------------------------------------------------------------------ settings


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


def project(cfg, environ: dict | None = None) -> str:
    env = os.environ if environ is None else environ
    return cfg.wandb.project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT


def entity(cfg, environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return cfg.wandb.entity or env.get("WANDB_ENTITY") or None


def run_group(cfg, environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return cfg.train.group or env.get("WANDB_RUN_GROUP") or None


def tags(cfg, environ: dict | None = None) -> list[str] | None:
    env = os.environ if environ is None else environ
    raw = list(cfg.train.tags) or [t for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return [str(t).strip()[:64] for t in raw] or None


def base_url(cfg, environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return cfg.wandb.base_url or env.get("WANDB_BASE_URL") or None


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit].strip("-")


def run_id(project_name: str, key: str) -> str:
    """A W&B run id that is the same every time for the same project and run folder (or name).

    Readable (the run folder's last part) and unique (a hash of the whole key); only the characters W&B allows."""
    digest = hashlib.sha256(f"{project_name}\n{key}".encode()).hexdigest()[:12]
    slug = _slug(key.rstrip("/").rsplit("/", 1)[-1])
    return f"{slug}-{digest}" if slug else digest


def wandb_root(cfg, run_dir: str, environ: dict | None = None) -> str:
    """The folder handed to wandb.init(dir=...): W&B writes `<this>/wandb/` (see the module docstring)."""
    env = os.environ if environ is None else environ
    chosen = cfg.wandb.dir or env.get("WANDB_DIR") or run_dir
    if not storage.is_remote(chosen):
        return storage.absolute(chosen)
    # W&B can only write to a local disk: a remote folder gets a local one named after the W&B run.
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(cache / "distrain" / "wandb" / run_id(project(cfg, env), run_dir))


def wandb_dir(cfg, run_dir: str) -> str:
    """Where W&B files of the run in `run_dir` end up (`offline-run-*` folders, logs)."""
    return os.path.join(wandb_root(cfg, run_dir), "wandb")


def offline_runs(path: str | Path, run: str | None = None) -> list[Path]:
    """The offline run folders in a W&B folder (or in the folder holding it), oldest first; only those of one
    W&B run when `run` (its id) is given (a shared WANDB_DIR holds the folders of many runs)."""
    base = Path(path)
    found = sorted(base.glob("offline-run-*")) or sorted(base.glob("wandb/offline-run-*"))
    return [p for p in found if p.is_dir() and (run is None or (p / f"run-{run}.wandb").exists())]


def sync_hint(cfg, run_dir: str) -> str | None:
    """For the driver at the end of a run: where its offline W&B data is and the command that uploads it."""
    runs = offline_runs(wandb_dir(cfg, run_dir), run_id(project(cfg), run_dir))
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


def run_config(cfg, **extra: Any) -> dict[str, Any]:
    """The resolved config, flattened to dotted keys and redacted, as W&B shows it."""
    secrets = secret_values()
    flat = {k: redact(v, secrets) for k, v in cfg.flat().items()}
    flat.update({f"distrain.{k}": redact(v, secrets) for k, v in extra.items() if v is not None})
    return flat


# ------------------------------------------------------------------------------------------------ starting W&B


def _init(cfg, *, run_dir: str, config: dict | None, name: str | None = None, job_type: str | None = None,
          group: str | None = None, mode: str | None = None):
    """wandb.init with distrain's conventions; returns (run, env var restorer). Raises on any failure."""
    import wandb

    mode = mode or resolve_mode(cfg)
    root = wandb_root(cfg, run_dir)
    Path(root, "wandb").mkdir(parents=True, exist_ok=True)
    # Mode and server go in the environment as well as into wandb.init: wandb's process-wide parts (its own error
    # telemetry) read them from there, and an offline run would otherwise still reach for the W&B cloud. Staged
    # table images stay with the run (see module docstring) unless the user chose a data dir.
    scoped = {"WANDB_MODE": mode}
    url = base_url(cfg)
    if url:
        scoped["WANDB_BASE_URL"] = url
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
    if url:
        settings["base_url"] = url
    proj = project(cfg)
    try:
        run = wandb.init(project=proj, entity=entity(cfg), id=run_id(proj, run_dir), name=name or cfg.train.name,
                         resume="allow", dir=root, mode=mode, group=group or run_group(cfg),
                         job_type=job_type or cfg.train.job_type, tags=tags(cfg), config=config,
                         settings=wandb.Settings(**settings))
    except BaseException:
        restore()
        raise
    return run, restore


def _offline_folder(run) -> str | None:
    try:
        return str(run.settings.sync_dir) if run.settings.mode == "offline" else None
    except Exception:  # only informative
        return None


def start_tracker(cfg, rank: int = 0, run_dir: str | None = None) -> Tracker:
    """A W&B-backed tracker on rank 0 (when W&B is on and starts), a no-op tracker everywhere else."""
    if rank != 0 or resolve_mode(cfg) == "disabled":
        return Tracker()
    run_dir = run_dir or storage.join(cfg.scaling.storage_path, cfg.train.name)
    chosen = cfg.wandb.dir or os.environ.get("WANDB_DIR") or run_dir
    if storage.is_remote(chosen):
        say(f"W&B files of {run_dir} go to the local folder {wandb_dir(cfg, run_dir)} (W&B cannot write to "
            f"{chosen.split('://', 1)[0]}://)")
    mode = resolve_mode(cfg)
    try:
        run, restore = _init(cfg, run_dir=run_dir, config=run_config(cfg, run_dir=run_dir))
    except Exception as e:  # W&B trouble of any kind must not cost the run
        if mode != "online":
            warn(f"W&B could not start ({type(e).__name__}: {_first_line(e)}); training continues without "
                 f"tracking (wandb.mode={cfg.wandb.mode}, resolved to {mode})")
            return Tracker()
        # The server did not answer (down, unreachable, stalled): the run is still recorded, offline, with the
        # same id, so `wandb sync` uploads it later as the run it would have been. One warning says so. The
        # failed attempt still holds that id in wandb's service process: a fresh service first.
        try:
            import wandb

            wandb.teardown()
            run, restore = _init(cfg, run_dir=run_dir, config=run_config(cfg, run_dir=run_dir), mode="offline")
        except Exception as e2:
            warn(f"W&B could not start online ({type(e).__name__}: {_first_line(e)}) nor offline "
                 f"({type(e2).__name__}: {_first_line(e2)}); training continues without tracking")
            return Tracker()
        tracker = WandbTracker(run, cfg, restore)
        tracker._warn_once(f"W&B server {base_url(cfg) or 'api.wandb.ai'} did not answer ({type(e).__name__}: "
                           f"{_first_line(e)}); logging offline to {tracker.offline_dir} instead (upload later with: "
                           f"{tracker.sync_command})")
        tracker._guard("set-up", tracker._define_metrics)
        return tracker
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

    def log(self, row: dict[str, Any]) -> None:
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
            warn(message)

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

    def log(self, row: dict[str, Any]) -> None:
        """A free-form row (phase boundaries, PBT exploits)."""
        if self.enabled:
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
        failed = bool(summary) and summary.get("status", "ok") not in ("ok", "stopped")  # "failed" or "nan"
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
            say(f"W&B offline run saved in {self.offline_dir}; upload it with: {self.sync_command}")
