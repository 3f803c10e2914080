"""What ran where: the runs and sweeps in a storage folder, and one run's summary and paths (`distrain runs`).

Usage:
    distrain runs [--storage outputs]          # name, kind, status, epochs, best top-1, backbone, when
    distrain runs show fashion_mnist_cpu       # its summary and where its model, curves and logs are
    from distrain.inference.runs import list_runs
    rows = list_runs("outputs")                # [{'name': ..., 'kind': 'run', 'status': 'finished', ...}, ...]

A folder is a run or a sweep when distrain's marker (`.distrain.json`) says so (or, for folders of earlier releases,
when it holds a run's config.yaml and Ray Train's checkpoint record, or a sweep_config.yaml). Status:
`running` (its lock names a live process, or a heartbeat younger than the lock's stale limit), `finished` (its
summary.json covers every epoch its config asks for), `stopped` (stopped by Ctrl-C or a scheduler; the same command
resumes it), `failed` / `incomplete` (checkpoints but no summary: it failed or was killed; rerunning resumes it).
Trials of a sweep are listed by `runs show SWEEP`, not at the top level.
"""

from __future__ import annotations

import time
from typing import Any

from distrain import storage


def _read(url: str) -> Any:
    try:
        return storage.read_json(url)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _config(folder: str, name: str) -> dict:
    import yaml

    try:
        return yaml.safe_load(storage.read_text(storage.join(folder, name))) or {}
    except (FileNotFoundError, OSError, ValueError, yaml.YAMLError):
        return {}


def _running(folder: str) -> bool:
    lock = storage.RunLock(folder)
    holder = lock.holder()
    return holder is not None and not lock.stale(holder)


def _mtime(folder: str, *names: str) -> float | None:
    fs, path = storage.fs_of(folder)
    for name in names:
        try:
            info = fs.info(f"{path.rstrip('/')}/{name}")
        except (FileNotFoundError, OSError):
            continue
        stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if hasattr(stamp, "timestamp"):
            return stamp.timestamp()
        if stamp:
            return float(stamp)
    return None


def describe(folder: str) -> dict | None:
    """One run or sweep folder as a row; None when it is neither."""
    marker = storage.owner(folder) or {}
    kind = marker.get("kind")
    if kind is None:
        if storage.exists(storage.join(folder, "sweep_config.yaml")):
            kind = "sweep"
        elif storage.exists(storage.join(folder, "checkpoint_manager_snapshot.json")):
            kind = "run"
    if kind not in ("run", "sweep"):
        return None
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    summary = _read(storage.join(folder, "summary.json")) or {}
    row: dict[str, Any] = {"name": name, "kind": kind, "folder": folder}
    if kind == "run":
        cfg = _config(folder, "config.yaml")
        planned = int((cfg.get("train") or {}).get("epochs") or 0)
        epochs = int(summary.get("epochs") or 0)
        if _running(folder):
            status = "running"
        elif summary:
            status = "stopped" if summary.get("status") == "stopped" else (
                "finished" if epochs >= planned else "incomplete")
        else:
            status = "incomplete" if storage.exists(storage.join(folder, "checkpoint_manager_snapshot.json")) \
                else "failed"
        row.update(status=status, epochs=f"{epochs}/{planned}" if planned else str(epochs),
                   best_top1=summary.get("best_val_top1"), backbone=(cfg.get("model") or {}).get("backbone", ""))
    else:
        cfg = _config(folder, "sweep_config.yaml")
        status = "running" if _running(folder) else ("finished" if summary else "incomplete")
        row.update(status=status, epochs=f"{summary.get('num_trials', '?')} trials",
                   best_top1=summary.get("best_val_top1"), backbone=(cfg.get("model") or {}).get("backbone", ""))
    when = _mtime(folder, "summary.json", "config.yaml", "sweep_config.yaml", storage.MARKER)
    row["when"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else ""
    return row


def list_runs(root: str) -> list[dict]:
    """The runs and sweeps directly in `root` (a storage path or URL), newest first."""
    fs, path = storage.fs_of(root)
    if not fs.exists(path):
        raise FileNotFoundError(f"no storage folder at {root}")
    rows = []
    for entry in fs.ls(path, detail=True):
        if entry.get("type") != "directory":
            continue
        row = describe(storage.url_of(root, entry["name"]))
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: r["when"], reverse=True)


def table(rows: list[dict]) -> str:
    cols = [("name", "name"), ("kind", "kind"), ("status", "status"), ("epochs", "epochs"),
            ("best_top1", "best top-1"), ("backbone", "backbone"), ("when", "when")]
    cells = [[h for _, h in cols]] + [[_cell(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def show(root: str, name: str) -> dict:
    """A run's (or sweep's) row, its summary and the paths a user looks for."""
    folder = storage.join(root, name)
    row = describe(folder)
    if row is None:
        known = ", ".join(r["name"] for r in list_runs(root)[:10]) or "none"
        raise FileNotFoundError(f"{folder} is not a distrain run or sweep (runs in {root}: {known})")
    summary = _read(storage.join(folder, "summary.json")) or {}
    paths = {k: storage.join(folder, f) for k, f in (("config", "config.yaml"), ("summary", "summary.json"),
                                                     ("model", "model"), ("curves", "curves.png"),
                                                     ("ray_log", "ray.log"), ("sweep_plot", "sweep.png"),
                                                     ("trials", "trials.csv"), ("best_config", "best.yaml"))}
    row["paths"] = {k: v for k, v in paths.items() if storage.exists(v)}
    row["summary"] = {k: v for k, v in summary.items() if k != "history"}
    if row["kind"] == "sweep":
        trials_root = storage.join(folder, "runs")
        fs, path = storage.fs_of(trials_root)
        row["trials"] = list_runs(trials_root) if fs.exists(path) else []
    return row
