"""Classify images with a model/ folder: files and folders in this process, or shards as a Ray Data batch job.

Usage:
    from distrain.inference.predict import Predictor, list_images, predict_shards, write_predictions
    p = Predictor.from_dir("runs/x/model")                        # device="auto": CUDA when present
    paths, ignored = list_images(["cat.jpg", "photos/"])            # folders: image files, recursively, sorted
    rows = p.predict_files(paths, top_k=5)
    rows[0]   # {'path': 'cat.jpg', 'classes': ['cat', 'dog', ...], 'probs': [0.93, 0.05, ...], 'error': ''}
    write_predictions(rows, "preds.csv")                          # .csv .json .jsonl .parquet; local or a bucket
    predict_shards("runs/x/model", "data/shards", "test", "s3://bucket/preds.parquet", concurrency=4)

Preprocessing is the transform the model was validated with (config.json's `preprocess`: shorter side resized,
center crop of crop_pct, mean/std). Files are decoded as `distrain shards build` decodes them (EXIF orientation
applied, transparency composited on white, 16-bit and CMYK converted, the decompression-bomb pixel limit), so a
photo taken on a phone gets the same prediction as the same photo stored upright, and as its sample in a shard.
A file that cannot be read or decoded becomes a row with `error` set (and no classes); the others go on.

Shards at scale: `predict_shards` is a Ray Data job. `ray.data.read_webdataset` reads the split's tar files
(raw bytes, no decoding by Ray: our `<key>.jpg/.cls/.json` layout reads as columns `jpg`, `cls`, `json`),
`map_batches` runs a pool of `ShardPredictor` actors (one GPU each when the cluster has GPUs), and the rows are
streamed to one file on the driver (CSV/Parquet/JSONL, local or bucket), or, for an `out` ending in '/', written
by Ray as a folder of Parquet files in parallel. Rows keep manifest order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrain.data.decode import DecodeError
from distrain.device import pick_device
from distrain.images import IMAGE_KEYS, IMAGE_SUFFIXES
from distrain.inference.evaluate import EvalError, check_classes, resolve_data

_BYTES_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names its buffer in messages


class PredictError(ValueError):
    """Prediction that cannot run at all (no inputs, an unknown output format)."""


def _ext(path: str) -> str:
    return Path(path).suffix.lower().lstrip(".")


def read_bytes(path: str) -> bytes:
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def list_images(inputs: list[str]) -> tuple[list[str], int]:
    """Files as given (even without an image suffix: the user named them), folders expanded to their image
    files (recursive, sorted, hidden ones left out). Returns (paths, non-image files left out of folders)."""
    paths, ignored = [], 0
    for item in inputs:
        item = str(item)
        if "://" in item:
            import fsspec

            fs, root = fsspec.core.url_to_fs(item)
            if fs.isdir(root):
                scheme = item.split("://", 1)[0]
                found = sorted(fs.find(root))
                images = [f for f in found if Path(f).suffix.lower() in IMAGE_SUFFIXES]
                ignored += len(found) - len(images)
                paths += [f"{scheme}://{f}" for f in images]
            else:
                paths.append(item)
            continue
        if not os.path.isdir(item):
            paths.append(item)  # a missing file is reported as that file's error
            continue
        for folder, dirs, files in os.walk(item):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(os.path.join(folder, name))
                else:
                    ignored += 1
    return paths, ignored


class Predictor:
    """A loaded model with its evaluation transform: encoded images in, top-k classes and probabilities out."""

    def __init__(self, loaded, device: str | torch.device = "auto", batch_size: int = 64):
        from distrain.data.transform import ImageTransform

        self.loaded, self.classes = loaded, list(loaded.classes)
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = loaded.model.to(self.device, memory_format=torch.channels_last).eval()
        pre = loaded.preprocess
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.transform = ImageTransform(int(pre["image_size"]), 0.0, train=False,
                                        crop_pct=float(pre.get("crop_pct", 0.875)))
        self.batch_size = batch_size
        self._rng = np.random.default_rng(0)  # the eval transform draws nothing; the signature wants one

    @classmethod
    def from_dir(cls, folder: str, device: str = "auto", batch_size: int = 64) -> Predictor:
        from distrain.models.folder import load_model_dir

        return cls(load_model_dir(folder), device, batch_size)

    def prepare(self, data: bytes, ext: str) -> np.ndarray:
        """Encoded bytes of a shard sample → the model's input crop, (S, S, 3) uint8 RGB. Raises DecodeError."""
        if not data:
            raise DecodeError("empty file")
        return self.transform(data, ext or "", self._rng)

    def prepare_file(self, data: bytes) -> np.ndarray:
        """An image file's bytes → the model's input crop, decoded as the shards builder decodes (EXIF orientation,
        alpha on white, 16-bit and CMYK to 8-bit RGB, pixel limit). Raises DecodeError with the builder's reason."""
        import warnings

        from distrain.shards.encode import decode_reason, load_image

        if not data:
            raise DecodeError("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns on odd EXIF or large images; only the outcome counts
                img, _ = load_image(data)
        except MemoryError:
            raise
        except Exception as e:
            raise DecodeError(decode_reason(e)) from None
        return self.transform.center(np.asarray(img))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 → (B, classes) float32 softmax probabilities."""
        from distrain.data import to_device

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = to_device(x, self.device, self.mean, self.std, channels_last=True)
        return self.model(x).float().softmax(1).cpu().numpy()

    def predict_encoded(self, items: list[tuple[bytes, str] | None], top_k: int = 5, files: bool = False
                        ) -> list[tuple[list[str], list[float], str]]:
        """(classes, probs, error) per item; None items and undecodable ones get an error and no classes.
        files: the items are image files (decoded as the builder does), not shard samples."""
        k = max(1, min(top_k, len(self.classes)))
        out: list[Any] = [None] * len(items)
        good, arrays = [], []
        for i, item in enumerate(items):
            if item is None:
                out[i] = ([], [], "no image in sample")
                continue
            try:
                arrays.append(self.prepare_file(item[0]) if files else self.prepare(*item))
                good.append(i)
            except DecodeError as e:
                out[i] = ([], [], f"cannot decode image: {_BYTES_REPR.sub('data', str(e))}")
        for start in range(0, len(good), self.batch_size):
            idx = good[start:start + self.batch_size]
            probs = self.probabilities(np.stack(arrays[start:start + self.batch_size]))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for row, i in enumerate(idx):
                out[i] = ([self.classes[j] for j in order[row]], [float(probs[row, j]) for j in order[row]], "")
        return out

    def predict_files(self, paths: list[str], top_k: int = 5, progress: bool = False) -> list[dict]:
        """One row per path, in order: {'path', 'classes', 'probs', 'error'}."""
        from tqdm.auto import tqdm

        rows: list[dict] = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            items: list[Any] = []
            errors: dict[int, str] = {}
            for i, path in enumerate(chunk):
                try:
                    items.append((read_bytes(path), _ext(path)))
                except FileNotFoundError:
                    items.append(None)
                    errors[i] = "file not found"
                except (IsADirectoryError, PermissionError, OSError) as e:
                    items.append(None)
                    errors[i] = f"cannot read: {e.strerror or e}"
            results = self.predict_encoded(items, top_k, files=True)
            for i, (path, (classes, probs, error)) in enumerate(zip(chunk, results, strict=True)):
                rows.append({"path": path, "classes": classes, "probs": probs, "error": errors.get(i, error)})
            bar.update(len(chunk))
        bar.close()
        return rows


# ------------------------------------------------------------------------------------------------ output


def flat_row(row: dict, top_k: int) -> dict:
    """A prediction row as flat columns: ..., class_1, prob_1, ..., class_k, prob_k, error."""
    out = {k: v for k, v in row.items() if k not in ("classes", "probs", "error")}
    for i in range(top_k):
        has = i < len(row["classes"])
        out[f"class_{i + 1}"] = row["classes"][i] if has else ""
        out[f"prob_{i + 1}"] = row["probs"][i] if has else None  # empty in CSV, null in Parquet/JSON
    out["error"] = row["error"]
    return out


def output_format(out: str) -> str:
    for suffix in (".csv", ".jsonl", ".json", ".parquet"):
        if out.lower().endswith(suffix):
            return suffix[1:]
    raise PredictError(f"--out {out}: unknown format (use .csv, .json, .jsonl or .parquet)")


def write_predictions(rows: list[dict], out: str, top_k: int | None = None) -> str:
    """Write rows to `out` (local path or fsspec URL); the format follows the suffix."""
    import fsspec

    fmt = output_format(out)
    top_k = top_k or max([len(r["classes"]) for r in rows] + [1])
    if fmt == "json":
        data = json.dumps([{**{k: v for k, v in r.items() if k not in ("classes", "probs")},
                            "predictions": [{"class": c, "prob": p} for c, p in zip(r["classes"], r["probs"],
                                                                                    strict=True)]}
                           for r in rows], indent=1).encode()
        with fsspec.open(out, "wb") as f:
            f.write(data)
        return out
    flat = [flat_row(r, top_k) for r in rows]
    if fmt == "jsonl":
        with fsspec.open(out, "wb") as f:
            f.write("".join(json.dumps(r) + "\n" for r in flat).encode())
        return out
    import pyarrow as pa

    table = pa.Table.from_pylist(flat) if flat else pa.table({})
    _write_table(table, out, fmt)
    return out


def _write_table(table, out: str, fmt: str) -> None:
    import fsspec
    import pyarrow.csv
    import pyarrow.parquet

    with fsspec.open(out, "wb") as f:
        if fmt == "csv":
            pyarrow.csv.write_csv(table, f)
        else:
            pyarrow.parquet.write_table(table, f)


class _TableSink:
    """Streams Arrow record batches into one CSV/Parquet/JSONL file (local or fsspec URL)."""

    def __init__(self, out: str):
        import fsspec

        self.fmt = output_format(out)
        if self.fmt == "json":
            raise PredictError(f"--out {out}: shard predictions stream as .jsonl, .csv or .parquet (or a folder "
                               f"URL ending in '/')")
        self.file = fsspec.open(out, "wb").open()
        self.writer = None

    def write(self, table) -> None:
        import pyarrow.csv
        import pyarrow.parquet

        if self.fmt == "jsonl":
            self.file.write("".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode())
            return
        if self.writer is None:
            self.writer = (pyarrow.csv.CSVWriter(self.file, table.schema) if self.fmt == "csv"
                           else pyarrow.parquet.ParquetWriter(self.file, table.schema))
        self.writer.write_table(table.cast(self.writer.schema) if self.fmt == "parquet" else table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.file.close()


# ------------------------------------------------------------------------------------ shards, Ray Data


class ShardPredictor:
    """The callable class Ray Data's actor pool runs: loads the model once, then predicts batches of samples."""

    def __init__(self, files_ref: list, model_name: str, top_k: int, device: str, threads: int, batch_size: int):
        import ray

        from distrain.models.folder import load_model_files

        torch.set_num_threads(max(1, threads))
        files = ray.get(files_ref[0])  # wrapped in a list so Ray Data passes the reference, not a copy
        self.predictor = Predictor(load_model_files(files, model_name, pick_device(device)), device, batch_size)
        self.top_k = max(1, min(top_k, len(self.predictor.classes)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["__key__"])
        columns = [c for c in IMAGE_KEYS if c in batch]
        items: list[Any] = []
        for i in range(n):
            item = next(((batch[c][i], c) for c in columns if batch[c][i] is not None), None)
            items.append(None if item is None else (bytes(item[0]), item[1]))
        results = self.predictor.predict_encoded(items, self.top_k)
        classes = self.predictor.classes
        labels, paths = [], []
        for i in range(n):
            raw = batch["cls"][i] if "cls" in batch else None
            try:
                index = int(bytes(raw).decode().strip()) if raw is not None else -1
            except ValueError:
                index = -1
            labels.append(classes[index] if 0 <= index < len(classes) else "")
            meta = batch["json"][i] if "json" in batch else None
            try:
                paths.append(str(json.loads(bytes(meta)).get("path", "")) if meta is not None else "")
            except (ValueError, AttributeError):
                paths.append("")
        out: dict[str, np.ndarray] = {
            "key": np.array([str(k) for k in batch["__key__"]], dtype=object),
            "url": np.array([str(u) for u in batch["__url__"]], dtype=object) if "__url__" in batch
            else np.array([""] * n, dtype=object),
            "path": np.array(paths, dtype=object),
            "label": np.array(labels, dtype=object),
        }
        for j in range(self.top_k):
            out[f"class_{j + 1}"] = np.array([r[0][j] if r[0] else "" for r in results], dtype=object)
            out[f"prob_{j + 1}"] = np.array([r[1][j] if r[1] else np.nan for r in results], dtype=np.float64)
        out["error"] = np.array([r[2] for r in results], dtype=object)
        return out


def _check_pool_fits(concurrency: int, cpus_per_actor: int, gpu: bool, resources: dict) -> None:
    """The actor pool must leave a CPU for the read tasks: actors that hold every CPU wait forever for input
    that no read task can run to produce (seen with 2 actors on a 2-CPU cluster). A cluster started here cannot
    grow, so that fails now; on a remote one (which may autoscale) it is a warning."""
    import sys

    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    problems = []
    if concurrency * cpus_per_actor > cpus - 1:
        problems.append(f"{concurrency} actor(s) × {cpus_per_actor} CPU leave no CPU for reading shards on a "
                        f"cluster with {cpus:g} CPUs")
    if gpu and concurrency > gpus:
        problems.append(f"{concurrency} GPU actor(s) but the cluster has {gpus:g} GPU(s)")
    if not problems:
        return
    message = "; ".join(problems) + ": lower --concurrency or --cpus-per-actor"
    if os.environ.get("RAY_ADDRESS"):
        print(f"distrain predict: warning: {message} (waiting for the cluster to grow)", file=sys.stderr)
        return
    raise PredictError(message)


def predict_shards(model_dir: str, data: str, split: str | None, out: str, *, top_k: int = 5,
                   batch_size: int = 64, concurrency: int = 1, use_gpu: str = "auto", cpus_per_actor: int = 1,
                   progress: bool = True) -> dict:
    """Predict every sample of a shard split with a Ray Data actor pool; write rows to `out`; return figures."""
    import time

    from distrain import runtime
    from distrain.data.sources import check_urls
    from distrain.models.folder import load_model_files, read_model_files

    t0 = time.perf_counter()
    files = read_model_files(model_dir)
    loaded = load_model_files(files, str(model_dir))  # fail here, not in an actor, when the folder is bad
    manifest, split = resolve_data(data, split)
    check_classes(loaded.classes, manifest.classes, str(model_dir), f"{manifest.location} (split '{split}')")
    urls = manifest.shard_urls(split)
    check_urls(urls)
    directory = out.endswith("/")
    if not directory:
        output_format(out)
    if concurrency < 1:
        raise PredictError(f"--concurrency must be >= 1, got {concurrency}")

    runtime.connect()
    import ray
    import ray.data

    resources = ray.cluster_resources()
    gpu = resources.get("GPU", 0) > 0 if use_gpu == "auto" else use_gpu in ("1", "true", "yes", True)
    _check_pool_fits(concurrency, cpus_per_actor, gpu, resources)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in manifest order, as local predict lists them
    ctx.enable_progress_bars = progress
    k = max(1, min(top_k, len(loaded.classes)))
    ds = ray.data.read_webdataset(urls, decoder=None)
    ds = ds.map_batches(
        ShardPredictor, batch_format="numpy", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={"files_ref": [ray.put(files)], "model_name": str(model_dir), "top_k": k,
                               "device": "cuda" if gpu else "cpu", "threads": cpus_per_actor,
                               "batch_size": batch_size})
    count = errors = labelled = correct = 0
    if directory:
        ds.write_parquet(out)
        stats = ray.data.read_parquet(out).select_columns(["label", "class_1", "error"])
        batches = stats.iter_batches(batch_format="pyarrow", batch_size=4096)
    else:
        sink = _TableSink(out)
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    try:
        for table in batches:
            if not directory:
                sink.write(table)
            label = table.column("label").to_pylist()
            pred = table.column("class_1").to_pylist()
            err = table.column("error").to_pylist()
            count += len(label)
            errors += sum(1 for e in err if e)
            labelled += sum(1 for t, e in zip(label, err, strict=True) if t and not e)
            correct += sum(1 for t, p, e in zip(label, pred, err, strict=True) if t and not e and t == p)
    finally:
        if not directory:
            sink.close()
    expected = manifest.num_samples(split)
    if count != expected:
        raise PredictError(f"predicted {count} samples but {manifest.location} split '{split}' lists {expected}")
    wall = time.perf_counter() - t0
    return {"out": out, "count": count, "errors": errors, "labelled": labelled,
            "top1": correct / labelled if labelled else None, "split": split, "data": manifest.location,
            "concurrency": concurrency, "gpu": gpu, "wall_s": round(wall, 2),
            "images_per_s": round(count / max(1e-9, wall), 1)}


__all__ = ["EvalError", "PredictError", "Predictor", "ShardPredictor", "list_images", "predict_shards",
           "write_predictions"]
