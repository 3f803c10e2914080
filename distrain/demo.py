"""The embedded default end to end: Fashion-MNIST on this machine, no GPU, no internet (`make demo`).

Usage:
    distrain demo                 # ~4.5 minutes on 2 CPU cores; a second run reuses what is built
    distrain demo --quick         # a tiny subset, one epoch per trial: the test suite runs this

Steps, each printed as it starts, each reusing its output when it is already there:
  1. shards    Fashion-MNIST from Debian's package → data/fashion-mnist (train / val / test)
  2. cluster   a local Ray cluster (loopback only)
  3. sweep     Ray Tune over learning rate, unfreeze depth and augmentation strength
               (configs/tune_fashion_mnist_cpu.yaml)
  4. train     the best values applied to the longer recipe (configs/fashion_mnist_cpu.yaml), 2 DDP workers
  5. evaluate  the trained model on the test split (10,000 images it never saw)
  6. export    ONNX, checked against PyTorch
  7. report    trial table, test top-1 and where everything is, in REPORT.md and as the last JSON line
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distrain.config import Config, load_config

# The final run of the demo: the recipe of configs/fashion_mnist_cpu.yaml cut to fit the demo's few minutes (two
# thirds of the training images, 3 epochs, 64 px: 2.2 minutes on 2 cores at unfreeze depth 4, longer if the sweep
# picks a deeper one); `distrain train --config configs/fashion_mnist_cpu.yaml` runs the whole recipe.
DEMO_TRAIN = {"data.train_limit": 36000, "train.epochs": 3, "data.image_size": 64, "train.name": "demo_best"}
# The quick variant: same steps, a few hundred images, one epoch per trial, two trials.
QUICK_SWEEP = {"data.train_limit": 256, "data.val_limit": 128, "train.epochs": 1, "tune.num_samples": 2,
               "tune.scheduler": "fifo", "tune.name": "demo_quick_sweep"}
QUICK_TRAIN = {"data.image_size": 64, "data.train_limit": 512, "data.val_limit": 256, "train.epochs": 1,
               "train.name": "demo_quick_best"}


class Step:
    """Prints a numbered step with its duration, so a user sees where the demo is and what takes long."""

    def __init__(self, log=print):
        self.log, self.t_start, self.n = log, time.perf_counter(), 0

    def __call__(self, title: str) -> None:
        self.n += 1
        elapsed = time.perf_counter() - self.t_start
        self.log(f"\n=== [{self.n}/7] {title}   (demo time so far {elapsed / 60:.1f} min)", flush=True)


def _searched_values(best_cfg: Config, space: dict) -> dict[str, Any]:
    flat = best_cfg.flat()
    return {key: flat[key] for key in space}


def run_demo(root: str | Path = ".", *, quick: bool = False, log=print) -> dict[str, Any]:
    from distrain import runtime
    from distrain.inference.evaluate import evaluate_model
    from distrain.inference.export import export_model
    from distrain.shards.build import BuildOptions, build_shards
    from distrain.train import fit
    from distrain.tune.sweep import run_sweep

    root = Path(root).absolute()
    step = Step(log)
    t0 = time.perf_counter()
    shards = root / ("data/fashion-mnist-quick" if quick else "data/fashion-mnist")
    outputs = root / "outputs"

    step("shards: Fashion-MNIST → WebDataset shards")
    if (shards / "manifest.json").exists():
        log(f"reusing {shards}")
    else:
        options = BuildOptions(workers=2, limit=600 if quick else 0, val_fraction=0.1)
        result = build_shards("fashion-mnist", str(shards), options, progress=True)
        log(json.dumps(result.figures()))

    step("cluster: a local Ray cluster (loopback only)")
    runtime.connect()
    log(json.dumps(runtime.cluster_summary()))

    sweep_cfg = load_config(root / "configs/tune_fashion_mnist_cpu.yaml",
                            {"data.shards": str(shards), "scaling.storage_path": str(outputs),
                             **(QUICK_SWEEP if quick else {})})
    step(f"sweep: learning rate × unfreeze depth × augmentation strength (Ray Tune, "
         f"{sweep_cfg.tune.scheduler.upper()})")
    sweep = run_sweep(sweep_cfg)
    log(sweep.format())

    step("train: the best values on the longer recipe (2 DDP workers)")
    best_cfg = load_config(sweep.summary["best_config"])
    searched = _searched_values(best_cfg, sweep_cfg.tune.space)
    log(f"best sweep values: {searched}")
    train_cfg = load_config(root / "configs/fashion_mnist_cpu.yaml",
                            {"data.shards": str(shards), "scaling.storage_path": str(outputs), **searched,
                             **(QUICK_TRAIN if quick else DEMO_TRAIN)})
    summary = fit(train_cfg)

    step("evaluate: the test split, never seen in training or the sweep")
    eval_dir = Path(summary["run_dir"]) / "eval-test"
    metrics = evaluate_model(summary["model_dir"], str(shards), "test", out_dir=str(eval_dir), workers=1,
                             loader_workers=1, progress=True)

    step("export: ONNX, checked against PyTorch")
    onnx_path = Path(summary["run_dir"]) / "model.onnx"
    exported = export_model(summary["model_dir"], "onnx", str(onnx_path))

    step("report")
    report = {
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "test_images": metrics["count"],
        "best_val_top1": summary["best_val_top1"],
        "sweep_best_val_top1": sweep.summary["best_val_top1"],
        "best_params": searched,
        "trials_csv": sweep.summary["trials_csv"],
        "run_dir": summary["run_dir"],
        "model_dir": summary["model_dir"],
        "curves_png": str(Path(summary["run_dir"]) / "curves.png"),
        "sweep_png": sweep.summary.get("sweep_png", ""),
        "confusion_png": metrics["confusion_png"],
        "errors_png": metrics["errors_png"],
        "metrics_json": metrics["metrics_json"],
        "onnx": exported["out"],
        "onnx_max_abs_diff": exported["max_abs_diff"],
        "wandb_runs": _offline_runs(Path(sweep.summary["sweep_dir"]), Path(summary["run_dir"])),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    text = format_report(report, sweep)
    (outputs / ("REPORT-quick.md" if quick else "REPORT.md")).write_text(text)
    report["report"] = str(outputs / ("REPORT-quick.md" if quick else "REPORT.md"))
    log(text)
    return report


def format_report(r: dict[str, Any], sweep) -> str:
    return f"""# distrain demo report

Fashion-MNIST, {r['test_images']:,} test images; the whole demo ran on this machine in {r['minutes']} minutes.

## Sweep (Ray Tune)
{sweep.format()}

Best values: {', '.join(f'`{k}={v}`' for k, v in r['best_params'].items())} (val top-1 {r['sweep_best_val_top1']:.4f}
in the sweep). Table: {r['trials_csv']}; curves of every trial: {r['sweep_png'] or 'none'}

## Final model
- test top-1 **{r['test_top1']:.4f}**, top-5 {r['test_top5']:.4f} (best val top-1 {r['best_val_top1']:.4f})
- run folder: {r['run_dir']}
- model folder: {r['model_dir']}
- learning curves: {r['curves_png']}
- confusion matrix: {r['confusion_png']}
- worst misclassifications: {r['errors_png']}
- metrics: {r['metrics_json']}
- ONNX export: {r['onnx']} (max |Δ| vs PyTorch {r['onnx_max_abs_diff']:.2e})

## Weights & Biases
{_format_wandb(r)}
"""


def _offline_runs(sweep_dir: Path, run_dir: Path) -> dict[str, list[str]]:
    """The W&B offline run folders the demo wrote: one per trial, the sweep's summary run, the final run."""
    def runs(pattern: str, root: Path) -> list[str]:
        return sorted(str(p) for p in root.glob(pattern) if p.is_dir())
    return {"trials": runs("runs/*/wandb/offline-run-*", sweep_dir), "sweep": runs("wandb/offline-run-*", sweep_dir),
            "final": runs("wandb/offline-run-*", run_dir)}


def _format_wandb(r: dict[str, Any]) -> str:
    found = r["wandb_runs"]
    if not any(found.values()):
        return "W&B was disabled for this run."
    lines = ["Offline runs (no WANDB_API_KEY), grouped by sweep in the W&B UI once uploaded:",
             f"- {len(found['trials'])} trial run(s): {Path(r['trials_csv']).parent}/runs/*/wandb",
             f"- the sweep's summary run (trial table, best values): {', '.join(found['sweep']) or 'none'}",
             f"- the final run: {', '.join(found['final']) or 'none'}",
             "", "Upload them all with:", "", "    wandb sync " + " ".join(
                 found["trials"] + found["sweep"] + found["final"])]
    return "\n".join(lines)
