"""Benchmark: shard-writing throughput (images/s) with 1 and 2 encode workers on the same input.

Usage:
    python -m distrain.shards.bench                   # makes 800 ~500 px JPEGs, prints figures + a JSON line
    python -m distrain.shards.bench photos/ --workers 1 2 4 --max-side 256
    from distrain.shards.bench import benchmark
    figures = benchmark(None, workers=(1, 2))             # {'images_per_s_w1': ..., 'speedup_w2_vs_w1': ...}

Each run is a full `build_shards` (decode, EXIF, resize when asked, JPEG encode, tar write, sha256) into a
fresh folder, timed from the first record to the last shard; source listing and the manifest are excluded, the
start of the worker pool is included (it is part of a real build). Every setting runs `repeats` times,
interleaved, and the best run counts, which filters out noise from whatever else the machine is doing. The
generated images are photo-like (smooth shapes, gradients and sensor-like noise) so JPEG costs are realistic,
in 4 classes, sizes 400-600 px.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_bench_images(root: str | Path, num_images: int = 800, side: int = 500, num_classes: int = 4,
                      seed: int = 0, start: int = 0) -> Path:
    """An ImageFolder of photo-like JPEGs around `side` px (longer side within ±20%), quality 92; files are
    numbered from `start` (so several processes can fill one folder)."""
    root = Path(root)
    rng = np.random.default_rng([seed, start])
    for i in range(start, start + num_images):
        label = i % num_classes
        long_side = int(side * rng.uniform(0.8, 1.2))
        short_side = int(long_side * 0.75)
        w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
        # Smooth content (a gradient and a few blobs per channel) drawn at 1/8 scale and upsampled, plus noise
        # at full scale: close to a photo's JPEG cost, and fast to make.
        sw, sh = max(2, w // 8), max(2, h // 8)
        yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
        small = np.empty((sh, sw, 3), np.float32)
        for c in range(3):
            field_ = xx / sw * rng.uniform(-80, 80) + yy / sh * rng.uniform(-80, 80) + rng.uniform(60, 190)
            for _ in range(4):
                cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.05, 0.3) * max(sw, sh)
                field_ += rng.uniform(-90, 90) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            small[..., c] = field_
        smooth = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
        smooth = smooth.resize((w, h), Image.Resampling.BICUBIC)
        img = np.asarray(smooth, np.float32) + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", "JPEG", quality=92)
    return root


def benchmark(source_dir_or_none: str | Path | None = None, workers: tuple[int, ...] = (1, 2),
              num_images: int = 800, side: int = 500, max_side: int = 0, quality: int = 90, repeats: int = 2,
              work_dir: str | Path | None = None, log=print) -> dict:
    """Time `distrain shards build` on one input for each worker count; returns the figures."""
    from distrain.shards.build import BuildOptions, build_shards
    from distrain.shards.sources import open_source

    tmp = Path(tempfile.mkdtemp(prefix="distrain-bench-shards-", dir=work_dir))
    try:
        if source_dir_or_none is None:
            log(f"generating {num_images} photo-like JPEGs of ~{side} px in {tmp / 'images'}")
            source_dir = make_bench_images(tmp / "images", num_images, side)
            generated = True
        else:
            source_dir, generated = Path(source_dir_or_none), False
        source = open_source(str(source_dir))
        n = source.num_records
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        figures: dict = {"images": n, "generated": generated, "image_side": side if generated else None,
                         "max_side": max_side, "quality": quality, "repeats": repeats, "cpus": cpus}
        digests, best = {}, {}
        for r in range(repeats):  # interleaved, so a burst of load elsewhere hits every setting alike
            for w in workers:
                out = tmp / f"out-w{w}-{r}"
                result = build_shards(source, str(out), BuildOptions(val_fraction=0.1, max_side=max_side,
                                                                      quality=quality, workers=w))
                if w not in best or result.write_seconds < best[w].write_seconds:
                    best[w] = result
                digests[w] = [s.sha256 for split in result.manifest.splits.values() for s in split.shards]
                shutil.rmtree(out, ignore_errors=True)
        for w in workers:
            b = best[w]
            rate = (b.written + len(b.manifest.skipped)) / b.write_seconds
            figures[f"images_per_s_w{w}"] = round(rate, 1)
            figures[f"seconds_w{w}"] = round(b.write_seconds, 3)
            figures["bytes_per_image"] = round(b.figures()["bytes"] / max(b.written, 1))
            log(f"--workers {w}: {rate:7.1f} images/s ({b.write_seconds:.2f} s for {n} images, "
                f"best of {repeats})")
        base = workers[0]
        for w in workers[1:]:
            figures[f"speedup_w{w}_vs_w{base}"] = round(figures[f"images_per_s_w{w}"] /
                                                        figures[f"images_per_s_w{base}"], 2)
        # The parent writes in plan order, so the bytes must not depend on the worker count.
        figures["identical_shards"] = len({tuple(d) for d in digests.values()}) == 1
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distrain.shards.bench", description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", help="image folder (default: generate photo-like JPEGs)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=800, help="images to generate (default 800)")
    p.add_argument("--side", type=int, default=500, help="side of generated images (default 500)")
    p.add_argument("--max-side", type=int, default=0, help="as `shards build --max-side` (default 0 = keep)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    figures = benchmark(args.source, tuple(args.workers), args.images, args.side, args.max_side, args.quality,
                        args.repeats)
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
