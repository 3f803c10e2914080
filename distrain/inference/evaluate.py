"""Evaluate a model/ folder on a shard split: exact-once, in-process or split over N Ray workers, with figures.

Usage:
    from distrain.inference.evaluate import evaluate_model
    result = evaluate_model("runs/x/model", "data/shards", "test", workers=4)      # Ray, 4 exact-once shares
    result = evaluate_model("runs/x/model", "data/shards/test", workers=1)           # in-process, no Ray
    result["top1"], result["top5"], result["macro_f1"]
    result["metrics_json"], result["confusion_png"], result["errors_png"]           # written to out_dir

How N workers agree with one: worker r of N reads its exact-once share of the split through create_loader's
(rank, world_size) plan, so every sample is scored exactly once by exactly one worker; each returns sums (a
confusion matrix, loss sum, top-k hits, its most confident mistakes) and the driver adds them up. Sums, not
averages, so 1 and N workers give the identical confusion matrix. The batch loop is distrain.validation's, the one
training validates with, so `distrain eval` on the split a run validated on reproduces the run's val_top1.

Ray workers get the model as bytes through the object store (not a path: the driver's folder may not exist on
other nodes); the shards must be readable from every node, as for training (a bucket or shared mount).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from distrain.device import amp_settings, pick_device
from distrain.figures import confusion_png, errors_png
from distrain.validation import Misclassified, evaluate_batches

WORST_DEFAULT = 16


class EvalError(ValueError):
    """Evaluation that cannot run (data and model disagree, no such split), with what to do."""


# ------------------------------------------------------------------------------------------ data and model


def resolve_data(data: str, split: str | None = None):
    """(manifest, split) for `--data SHARDS [--split S]` or `--data SHARDS/S`. Default split: test, else val."""
    from distrain.shards.manifest import ManifestError, load_manifest

    data = str(data).rstrip("/")
    try:
        manifest = load_manifest(data)
    except ManifestError as first:
        parent, _, name = data.rpartition("/")
        try:
            manifest = load_manifest(parent or ".")
        except ManifestError:
            raise EvalError(str(first)) from None
        if name not in manifest.splits:
            raise EvalError(f"{data}: neither a shards folder nor a split of {manifest.location} (splits: "
                            f"{', '.join(manifest.splits)})") from None
        if split and split != name:
            raise EvalError(f"--data {data} names split '{name}' but --split says '{split}'") from None
        return manifest, name
    if split is None:
        split = "test" if "test" in manifest.splits else "val"
    if split not in manifest.splits:
        raise EvalError(f"{manifest.location}: no split '{split}' (splits: {', '.join(manifest.splits)})")
    if manifest.num_samples(split) == 0:
        raise EvalError(f"{manifest.location}: split '{split}' is empty")
    return manifest, split


def check_classes(model_classes: list[str], data_classes: list[str], model_name: str, data_name: str) -> None:
    """Fail before running when the data's labels do not mean the model's classes."""
    if list(model_classes) == list(data_classes):
        return
    if len(model_classes) != len(data_classes):
        detail = f"the model has {len(model_classes)} classes, the data {len(data_classes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(model_classes, data_classes, strict=True)) if a != b)
        detail = f"class {i} is {model_classes[i]!r} in the model but {data_classes[i]!r} in the data"
    raise EvalError(f"the classes of {data_name} differ from those of {model_name}: {detail} (model: "
                    f"{_preview(model_classes)}; data: {_preview(data_classes)})")


def _preview(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)})" if len(names) > n else "")


# ------------------------------------------------------------------------------------------- one share


@dataclass
class EvalPart:
    """The sums of one worker's exact-once share (what the driver adds up)."""

    rank: int
    confusion: np.ndarray
    loss_sum: float
    topk_hits: int
    worst: list = field(default_factory=list)
    decode_errors: int = 0
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_share(loaded, manifest, split: str, rank: int = 0, world_size: int = 1, *, batch_size: int = 64,
                   loader_workers: int = 1, amp: str = "auto", worst: int = WORST_DEFAULT, device="auto",
                   progress=None) -> EvalPart:
    """Evaluate share `rank` of `world_size` of a split with a loaded model (in this process)."""
    from distrain.data import BatchToDevice, create_loader

    device = pick_device(device)
    model = loaded.model.to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions, GPU and CPU
    pre = loaded.preprocess
    loader = create_loader(manifest, split, train=False, rank=rank, world_size=world_size, batch_size=batch_size,
                           loader_workers=loader_workers, image_size=int(pre["image_size"]),
                           crop_pct=float(pre.get("crop_pct", 0.875)), aug_strength=0.0)
    amp_dtype, _ = amp_settings(amp, device)
    t0 = time.perf_counter()
    prepare = BatchToDevice(device, pre["mean"], pre["std"], channels_last=True)
    meter, rows, decode_errors = evaluate_batches(model, loader, prepare, len(loaded.classes), amp_dtype, worst,
                                                  progress)
    return EvalPart(rank, meter.confusion.cpu().numpy(), float(meter.loss_sum), int(meter.topk_hits), rows,
                    decode_errors, list(loader.dropped), time.perf_counter() - t0)


def _ray_share(files: dict, manifest, split: str, rank: int, world_size: int, options: dict) -> EvalPart:
    """A Ray task: load the model from its files, evaluate share `rank`, report progress on the driver."""
    from ray.experimental.tqdm_ray import tqdm

    from distrain.models.folder import load_model_files

    threads = max(1, int(options.pop("cpus", 1)) - int(options.get("loader_workers", 0)))
    torch.set_num_threads(threads)
    device = pick_device(options.pop("device", "auto"))
    loaded = load_model_files(files, options.pop("model_name", "model"), device)
    total = _share_size(manifest, split, rank, world_size)
    bar = tqdm(total=total, desc=f"eval {rank + 1}/{world_size}", unit="img") if options.pop("progress") else None
    try:
        return evaluate_share(loaded, manifest, split, rank, world_size, device=device, progress=bar, **options)
    finally:
        if bar is not None:
            bar.close()


def _share_size(manifest, split: str, rank: int, world_size: int) -> int:
    n = manifest.num_samples(split)
    return (rank + 1) * n // world_size - rank * n // world_size


# ----------------------------------------------------------------------------------------------- driver


def default_out_dir(model_dir: str, split: str) -> str:
    """`<model>/../eval-<split>`."""
    model_dir = str(model_dir).rstrip("/")
    parent = model_dir.rpartition("/")[0] if "://" in model_dir else os.path.dirname(os.path.abspath(model_dir))
    return f"{parent}/eval-{split}"


def evaluate_model(model_dir: str, data: str, split: str | None = None, *, out_dir: str | None = None,
                   workers: int = 1, local: bool = False, batch_size: int = 64, loader_workers: int = 1,
                   amp: str = "auto", worst: int = WORST_DEFAULT, device: str = "auto", use_gpu: str = "auto",
                   cpus_per_worker: int = 0, progress: bool = True) -> dict:
    """Evaluate, write metrics.json, confusion.png and errors.png to out_dir; returns the figures.

    workers > 1 runs N Ray tasks (connecting to Ray if needed), each on its exact-once share; `local` (or
    workers == 1) runs in this process, the N shares one after another when workers > 1.
    """
    from distrain.data.sources import check_urls
    from distrain.models.folder import load_model_files, read_model_files

    t0 = time.perf_counter()
    if workers < 1:
        raise EvalError(f"--workers must be >= 1, got {workers}")
    files = read_model_files(model_dir)
    loaded = load_model_files(files, str(model_dir))
    manifest, split = resolve_data(data, split)
    check_classes(loaded.classes, manifest.classes, str(model_dir), f"{manifest.location} (split '{split}')")
    check_urls(manifest.shard_urls(split))  # a missing shard fails here, not in a worker
    options = dict(batch_size=batch_size, loader_workers=loader_workers, amp=amp, worst=worst)

    t_eval = time.perf_counter()
    if local or workers == 1:
        from tqdm.auto import tqdm

        dev = pick_device(device)
        bar = tqdm(total=manifest.num_samples(split), desc=f"eval {split}", unit="img", disable=not progress)
        loaded.model.to(dev)
        parts = [evaluate_share(loaded, manifest, split, r, workers, device=dev, progress=bar, **options)
                 for r in range(workers)]
        bar.close()
        mode, gpu = "local", dev.type == "cuda"
    else:
        parts, gpu = _run_on_ray(files, str(model_dir), manifest, split, workers, options, device, use_gpu,
                                 cpus_per_worker, progress)
        mode = "ray"

    eval_s = time.perf_counter() - t_eval  # Ray: includes starting the workers and loading the model there
    result = combine(parts, loaded.classes, worst)
    result.update({
        "model": str(model_dir), "data": manifest.location, "split": split, "workers": workers, "mode": mode,
        "gpu": gpu, "wall_s": round(time.perf_counter() - t0, 2), "eval_s": round(eval_s, 2),
        "images_per_s": round(result["count"] / max(1e-9, eval_s), 1),
        "model_provenance": loaded.meta.get("provenance", {}),
        "preprocess": loaded.preprocess,
    })
    return write_outputs(result, out_dir or default_out_dir(model_dir, split))


def _run_on_ray(files, model_name, manifest, split, workers, options, device, use_gpu, cpus_per_worker,
                progress) -> tuple[list[EvalPart], bool]:
    from distrain import runtime

    ray = runtime.connect()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpu = gpus > 0 if use_gpu == "auto" else use_gpu in ("1", "true", "yes", True)
    cpus = cpus_per_worker or options["loader_workers"] + 1
    task = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0, max_retries=1)(_ray_share)
    files_ref = ray.put(files)
    manifest_ref = ray.put(manifest)
    refs = [task.remote(files_ref, manifest_ref, split, r, workers,
                        {**options, "cpus": cpus, "device": "cuda" if gpu else "cpu", "model_name": model_name,
                         "progress": progress}) for r in range(workers)]
    try:
        parts = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise EvalError(f"an eval worker failed: {cause if cause is not None else e}") from None
    return sorted(parts, key=lambda p: p.rank), gpu


def combine(parts: list[EvalPart], classes: list[str], worst: int = WORST_DEFAULT) -> dict:
    """Add up the workers' sums and summarize them (top-1, top-k, per-class precision/recall/F1, confusion)."""
    from distrain.metrics import ClassificationMeter

    meter = ClassificationMeter(len(classes))
    for p in parts:
        meter.confusion += torch.tensor(np.asarray(p.confusion), dtype=torch.int64)  # Ray's arrays are read-only
        meter.loss_sum += p.loss_sum
        meter.topk_hits += p.topk_hits
    m = meter.compute(classes)
    per_class = {n: {"precision": m["per_class_precision"][n], "recall": m["per_class_acc"][n],
                     "f1": m["per_class_f1"][n], "support": m["support"][n]} for n in classes}
    count = m["count"]
    return {
        "top1": m["top1"], "top5": m["top5"], "topk": meter.topk, "count": count, "loss": m["loss"],
        "macro_f1": m["macro_f1"],
        "macro_precision": float(np.mean([v["precision"] for v in per_class.values() if v["support"] > 0]))
        if count else 0.0,
        "macro_recall": float(np.mean([v["recall"] for v in per_class.values() if v["support"] > 0]))
        if count else 0.0,
        "per_class": per_class, "classes": list(classes), "confusion": m["confusion"],
        "decode_errors": sum(p.decode_errors for p in parts),
        "dropped": [d for p in parts for d in p.dropped][:100],
        "worst": Misclassified.merge([p.worst for p in parts], worst),
        "shares": [{"rank": p.rank, "count": int(p.confusion.sum()), "seconds": round(p.seconds, 2)}
                   for p in parts],
    }


# ---------------------------------------------------------------------------------------------- outputs


def write_outputs(result: dict, out_dir: str) -> dict:
    """metrics.json, confusion.png and errors.png into out_dir (local or fsspec URL); returns result + paths."""
    from distrain import storage

    worst = result.pop("worst")
    out_dir = str(out_dir).rstrip("/")
    paths = {"metrics_json": f"{out_dir}/metrics.json", "confusion_png": f"{out_dir}/confusion.png",
             "errors_png": f"{out_dir}/errors.png"}
    result = {**result, **paths, "out_dir": out_dir,
              "worst": [{"key": k, "true": result["classes"][t], "predicted": result["classes"][p],
                         "confidence": round(c, 4)} for c, k, _, t, p in worst]}
    storage.write_json(paths["metrics_json"], result)
    storage.write_bytes(paths["confusion_png"], confusion_png(np.asarray(result["confusion"]), result["classes"],
                                                              f"{result['split']}: top-1 {result['top1']:.4f} "
                                                              f"({result['count']} images)"))
    storage.write_bytes(paths["errors_png"], errors_png(worst, result["classes"], result["count"]))
    return result


def format_report(result: dict) -> str:
    """The per-class table and headline figures, for the console."""
    k = result["topk"]
    width = max([5, *(len(n) for n in result["classes"])])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name, v in result["per_class"].items():
        lines.append(f"{name:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  {v['f1']:6.4f}  {v['support']:7d}")
    lines += ["",
              f"{result['split']}: {result['count']} images, top-1 {result['top1']:.4f}, top-{k} {result['top5']:.4f}, "
              f"macro F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f} ({result['workers']} worker(s), "
              f"{result['mode']}, {result['images_per_s']:,.0f} img/s)"]
    if result["decode_errors"]:
        lines.append(f"{result['decode_errors']} undecodable image(s) skipped, e.g. {result['dropped'][:3]}")
    lines.append(f"wrote {result['metrics_json']}, {result['confusion_png']}, {result['errors_png']}")
    return "\n".join(lines)
