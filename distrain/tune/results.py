"""What a finished sweep produced: one record per trial, the trial table, the best trial and its outputs.

Usage:
    from distrain.tune.results import collect_trials, write_outputs
    trials = collect_trials(result_grid, sweep_dir, cfg)       # [TrialRecord], in trial order
    summary = write_outputs(trials, cfg, space, sweep_dir)     # trials.csv, best.yaml, best_model/, summary.json

A trial's numbers come from its Ray Train run folder (`<sweep_dir>/runs/<trial>/`, read through
distrain.train.checkpoint), not from Tune's result: the latest checkpoint there holds the whole epoch history,
including epochs trained before an interrupted sweep was resumed, and it exists for trials that ASHA stopped (Tune's
`Result.metrics` is empty for those, since the checkpoints are Train's, not Tune's). Stop reasons: `completed` (all
train.epochs ran), `stopped early by ASHA` (fewer epochs, no error), `failed: <error>` (the trial raised: non-finite
loss, a worker that kept dying, ...).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

from distrain import storage
from distrain.config import Config, to_yaml
from distrain.console import warn
from distrain.train import checkpoint
from distrain.tune.trial import RUNS, lineage, stopped_by_tune


@dataclass
class TrialRecord:
    """One trial of a sweep, as the table shows it."""

    name: str
    params: dict[str, Any]
    run_dir: str
    epochs_planned: int
    history: list[dict] = field(default_factory=list)  # per-epoch metrics (without per-class accuracies)
    checkpoints: list[tuple[str, dict]] = field(default_factory=list)  # (path, metrics) kept by Ray Train
    error: str | None = None
    stopped: bool = False  # Tune stopped it (the scheduler) while its Train run was going
    exploits: list[dict] = field(default_factory=list)  # PBT: {epoch, donor, old, new} per checkpoint taken over
    starts: list[dict] = field(default_factory=list)    # every start of the trial (tune/trial.py lineage)

    @property
    def epochs(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    def best(self, metric: str, mode: str) -> dict | None:
        """The epoch with the best value of `metric` (ties: the earlier epoch)."""
        scored = [h for h in self.history if _finite(h.get(metric))]
        if not scored:
            return None
        sign = 1 if mode == "max" else -1
        return max(scored, key=lambda h: (sign * h[metric], -h["epoch"]))

    @property
    def best_val_top1(self) -> float | None:
        best = self.best("val_top1", "max")
        return best["val_top1"] if best else None

    def status(self, scheduler: str) -> str:
        if self.error is not None:
            return f"failed: {self.error}"
        if self.stopped or self.epochs < self.epochs_planned:
            return "stopped early by ASHA" if scheduler == "asha" else f"stopped after {self.epochs} epoch(s)"
        return "completed"

    def best_checkpoint(self, metric: str, mode: str) -> str | None:
        """The kept checkpoint with the best `metric` (Ray Train keeps the best few by val top-1, and the latest)."""
        scored = [(p, m) for p, m in self.checkpoints if _finite(m.get(metric))]
        if not scored:
            return None
        sign = 1 if mode == "max" else -1
        return max(scored, key=lambda pm: (sign * pm[1][metric], -pm[1].get("epoch", 0)))[0]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def error_text(error: BaseException | None) -> str | None:
    """The reason a trial failed, one line: the original exception's message, not Ray's wrapping traceback."""
    if error is None:
        return None
    cause = error
    for _ in range(5):  # RayTaskError(TrainingError) → TrainingError; TuneError wraps a RayTaskError
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    text = str(cause).strip()
    if "Traceback (most recent call last)" in text or not text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errs = [ln for ln in lines if ("Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0])]
        text = errs[-1] if errs else (lines[-1] if lines else type(cause).__name__)
    else:
        text = text.splitlines()[0]
        if type(cause).__name__ not in ("TrainingError",):
            text = f"{type(cause).__name__}: {text}"
    return text[:300]


def read_run(run_dir: str) -> tuple[list[dict], list[tuple[str, dict]]]:
    """(epoch history, kept checkpoints) of a Ray Train run folder; empty when it never checkpointed."""
    return checkpoint.history(run_dir), checkpoint.kept(run_dir)


def plain(value: Any) -> Any:
    """A numpy scalar from a searcher as the Python number it is (YAML and the config tree want those)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def run_folders(name: str, starts: list[dict]) -> list[str]:
    """The Train run folders of a trial's starts, in order: its name, then `<name>-g<k>` for the k-th start that
    began from a checkpoint (PBT: an exploit, or a resumed PBT sweep)."""
    return [f"{name}-g{k}" if s.get("from") else name for k, s in enumerate(starts)] or [name]


def exploits_of(name: str, starts: list[dict]) -> list[dict]:
    """PBT's exploits of a trial: the starts from another trial's checkpoint, with the values before and after."""
    out = []
    for prev, s in itertools.pairwise(starts):
        if s.get("from") and s.get("donor") and s["donor"] != name:
            changed = {k: (prev["params"].get(k), v) for k, v in s["params"].items() if prev["params"].get(k) != v}
            out.append({"epoch": s.get("start_epoch"), "donor": s["donor"], "changed": changed})
    return out


def collect_trials(result_grid, sweep_dir: str, cfg: Config) -> list[TrialRecord]:
    """One record per trial of a Tune ResultGrid, in the order the trials were created."""
    records = []
    for result in result_grid:
        name = os.path.basename(str(result.path).rstrip("/"))
        params = {k: plain(v) for k, v in (result.config or {}).items()}
        starts = lineage(sweep_dir, name)
        # the latest run folder that checkpointed holds the whole history (a PBT run carries its donor's epochs)
        run_dir, history, checkpoints = f"{sweep_dir}/{RUNS}/{name}", [], []
        for folder in reversed(run_folders(name, starts)):
            h, c = read_run(f"{sweep_dir}/{RUNS}/{folder}")
            if h:
                run_dir, history, checkpoints = f"{sweep_dir}/{RUNS}/{folder}", h, c
                break
        epochs = int(params.get("train.epochs", cfg.train.epochs))
        error = error_text(result.error)
        records.append(TrialRecord(name=name, params=params, run_dir=run_dir, epochs_planned=epochs,
                                   history=history, checkpoints=checkpoints, error=error,
                                   stopped=error is None and stopped_by_tune(sweep_dir, name),
                                   exploits=exploits_of(name, starts), starts=starts))
    return records


# ------------------------------------------------------------------------------------------------ outputs


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    scored = [t for t in trials if t.error is None and t.best(metric, mode) is not None]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda t: (sign * t.best(metric, mode)[metric], -t.epochs))


def rows(trials: list[TrialRecord], keys: list[str], scheduler: str) -> list[dict[str, Any]]:
    """The trial table as dicts (the CSV's rows and W&B's table)."""
    out = []
    for t in trials:
        best = t.best("val_top1", "max")
        row: dict[str, Any] = {"trial": t.name}
        row.update({k: t.params.get(k) for k in keys})
        row.update({"best_val_top1": best["val_top1"] if best else None,
                    "best_epoch": best["epoch"] if best else None,
                    "epochs": t.epochs,
                    "status": t.status(scheduler),
                    **({"exploits": "; ".join(
                        f"e{x['epoch']}: from {x['donor']} (" + ", ".join(f"{k} {_cell(a)}→{_cell(b)}"
                                                                       for k, (a, b) in x["changed"].items()) + ")"
                        for x in t.exploits)} if scheduler in ("pbt", "pb2") else {}),
                    "run_dir": t.run_dir})
        out.append(row)
    return out


def format_table(table: list[dict[str, Any]]) -> str:
    """A plain-text table for the console (run_dir left out; it is in the CSV)."""
    if not table:
        return "(no trials)"
    columns = [c for c in table[0] if c != "run_dir"]
    cells = [[_cell(r.get(c)) for c in columns] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any, width: int = 90) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"  # the CSV has it whole


def write_csv(table: list[dict[str, Any]], url: str) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["trial"])
    writer.writeheader()
    writer.writerows(table)
    return storage.write_text(url, buf.getvalue())


def best_config(cfg: Config, best: TrialRecord, trials: list[TrialRecord] | None = None) -> Config:
    """The base config with the best trial's values: a `distrain train` config, search space cleared. For a PBT
    winner whose values changed during training, a `train.phases` schedule that replays them (when every changed
    key can be set per phase), so the result can be trained again."""
    out = cfg.replace({**best.params, "tune.space": {}, "train.name": f"{cfg.tune.name}_best",
                       "train.job_type": "train", "train.group": "", "train.init_from": "",
                       "tune.scheduler": "fifo" if cfg.tune.scheduler in ("pbt", "pb2") else cfg.tune.scheduler})
    if cfg.tune.scheduler not in ("pbt", "pb2") or trials is None:
        return out
    schedule = pbt_schedule(best.name, cfg.train.epochs, {t.name: t for t in trials})
    keys = {k for _, values in schedule for k in values}
    from distrain.config.parse import PHASE_KEYS

    if len({tuple(sorted(v.items())) for _, v in schedule}) <= 1 or not keys <= set(PHASE_KEYS):
        return out  # one set of values throughout (or one PBT cannot phase): the final values
    return out.replace({"train.phases": [{"epochs": n, **values} for n, values in schedule]})


def pbt_schedule(name: str, upto: int, trials: dict[str, TrialRecord]) -> list[tuple[int, dict]]:
    """The searched values a PBT trial's weights were trained with, epoch by epoch up to `upto`, following its
    exploits back through its donors: [(epochs, values), ...] with neighbours of equal values merged."""
    def walk(n: str, end: int, limit: int | None = None, depth: int = 0) -> list[tuple[int, dict]]:
        t = trials.get(n)
        if t is None or end <= 0 or depth > 50:
            return []
        starts = (t.starts or [{"params": t.params}])[:limit]
        # the last start that trained epochs before `end` (one at or after it contributed nothing)
        k = max(i for i, s in enumerate(starts) if not s.get("from") or int(s.get("start_epoch") or 0) < end)
        s = starts[k]
        values = dict(s["params"])
        if not s.get("from"):
            return [(end, values)]
        begin, donor = int(s.get("start_epoch") or 0), s.get("donor")
        # epochs up to `begin` are the donor's (or, after a resume, this trial's own earlier starts)
        prefix = walk(donor, begin, k if donor == n else None, depth + 1)
        return [*prefix, (end - begin, values)]

    merged: list[tuple[int, dict]] = []
    for n, values in walk(name, upto):
        if merged and merged[-1][1] == values:
            merged[-1] = (merged[-1][0] + n, values)
        else:
            merged.append((n, values))
    return merged


def write_outputs(trials: list[TrialRecord], cfg: Config, keys: list[str], sweep_dir: str) -> dict[str, Any]:
    """Write trials.csv, best.yaml, best_model/ and summary.json into the sweep folder; returns the summary."""
    metric, mode, scheduler = cfg.tune.metric, cfg.tune.mode, cfg.tune.scheduler
    table = rows(trials, keys, scheduler)
    trials_csv = write_csv(table, f"{sweep_dir}/trials.csv")
    best = best_trial(trials, metric, mode)
    summary: dict[str, Any] = {
        "best_val_top1": None, "best_config": None, "trials_csv": trials_csv, "best_model": None,
        "num_trials": len(trials), "sweep_dir": sweep_dir, "best_trial": None, "best_params": None,
        "metric": metric, "best_metric": None,
        "num_completed": sum(t.status(scheduler) == "completed" for t in trials),
        "num_stopped": sum(t.status(scheduler).startswith("stopped") for t in trials),
        "num_failed": sum(t.error is not None for t in trials),
        "exploits": sum(len(t.exploits) for t in trials),
    }
    if best is not None:
        best_epoch = best.best(metric, mode)
        best_yaml = f"{sweep_dir}/best.yaml"
        header = (f"# Best trial {best.name} of sweep {cfg.tune.name}: {metric} {best_epoch[metric]:.4f} at epoch "
                  f"{best_epoch['epoch']}.\n# Train it: distrain train --config {best_yaml}\n")
        storage.write_text(best_yaml, header + to_yaml(best_config(cfg, best, trials)))
        model_dir = None
        ckpt = best.best_checkpoint(metric, mode)
        try:
            if ckpt is None:
                raise FileNotFoundError(f"no checkpoint of {best.run_dir} is kept")
            model_dir = checkpoint.to_model_dir(ckpt, f"{sweep_dir}/best_model", provenance={
                "sweep": cfg.tune.name, "trial": best.name, "run_dir": best.run_dir, "checkpoint": ckpt,
                "params": best.params, metric: best_epoch[metric]})
        except Exception as e:  # the table and best.yaml are still worth having
            warn(f"best_model/ not written ({type(e).__name__}: {e})")
        summary.update({"best_val_top1": best.best_val_top1, "best_config": best_yaml, "best_model": model_dir,
                        "best_trial": best.name, "best_params": best.params, "best_metric": best_epoch[metric],
                        "best_epoch": best_epoch["epoch"], "best_run_dir": best.run_dir})
    try:
        from distrain.figures import sweep_png

        storage.write_bytes(f"{sweep_dir}/sweep.png", sweep_png(
            [{"name": t.name, "history": t.history, "params": t.params, "status": t.status(scheduler)}
             for t in trials], keys, cfg.train.epochs, title=f"sweep {cfg.tune.name}"))
        summary["sweep_png"] = f"{sweep_dir}/sweep.png"
    except Exception as e:  # a picture must never cost the sweep's results
        warn(f"sweep.png not drawn ({type(e).__name__}: {e})")
    storage.write_json(f"{sweep_dir}/summary.json", {**summary, "trials": table})
    return summary
