"""Build WebDataset shards from a source: plan the splits, encode in a process pool, write tars in order.

Usage:
    from distrain.shards.build import BuildOptions, build_shards
    result = build_shards("photos/", "data/photos", BuildOptions(max_side=384, workers=4))
    result.manifest.num_samples("train"), result.figures()["images_per_s"]

Order of work, so that a bad request fails before anything is written and an interrupted build never leaves a
manifest naming an incomplete shard:
  1. open the source (lists and labels inputs; class errors raise here);
  2. check the output folder (exists and not empty → error without --overwrite; with it, the old manifest is
     deleted first);
  3. plan the splits (stratified val split, --limit, seeded shuffle);
  4. encode: worker processes decode/resize/encode chunks of records and return bytes; the parent writes the
     tar members in plan order, so the shards do not depend on the number of workers or their timing;
  5. write `_info.json` (timm's layout), then `manifest.json` last.
Inputs that do not decode are skipped with a reason and listed in the manifest; the build goes on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from distrain.shards.encode import Encoded, EncodeOptions, encode_chunk, encode_record
from distrain.shards.manifest import INFO_NAME, Manifest, SplitInfo, save_manifest, timm_info
from distrain.shards.manifest import figures as manifest_figures
from distrain.shards.sources import Source, open_source
from distrain.shards.split import plan_splits
from distrain.shards.writer import ShardWriter, prepare_output


class BuildError(ValueError):
    """Build options that do not make sense."""


@dataclass
class BuildOptions:
    val_fraction: float = 0.1   # of each class, when the source has no val split
    seed: int = 0               # val split, --limit and shuffle order
    shard_size: int = 1000      # samples per shard (0 = no limit)
    shard_bytes: int = 64_000_000  # bytes per shard (0 = no limit); whichever limit comes first
    max_side: int = 0           # shrink so the longer side is at most this (0 = keep)
    quality: int = 90           # JPEG quality
    lossless: bool = False      # PNG instead of JPEG
    workers: int = 0            # encode processes (0 = one per CPU; 1 = in this process)
    limit: int = 0              # at most this many samples per split, stratified (0 = all)
    overwrite: bool = False
    prefix: str = ""            # shard names: '<prefix>-<split>-NNNNNN.tar' (default '<split>-NNNNNN.tar')

    def check(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise BuildError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("shard_size", "shard_bytes", "max_side", "workers", "limit"):
            if getattr(self, name) < 0:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.quality <= 100:
            raise BuildError(f"--quality must be in [1, 100], got {self.quality}")
        if self.prefix and not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise BuildError(f"--prefix {self.prefix!r} may only use letters, digits, '_' and '-'")

    def num_workers(self) -> int:
        if self.workers:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def shard_prefix(self, split: str) -> str:
        return f"{self.prefix}-{split}" if self.prefix else split


@dataclass
class BuildResult:
    manifest: Manifest
    url: str                          # where manifest.json was written
    workers: int
    scan_seconds: float               # listing the source
    write_seconds: float              # encode + write
    warnings: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(s.num_samples for s in self.manifest.splits.values())

    def figures(self) -> dict:
        m = self.manifest
        return {
            "out": self.url.rsplit("/", 1)[0],
            **manifest_figures(m),
            "workers": self.workers,
            "seconds": round(self.scan_seconds + self.write_seconds, 3),
            "images_per_s": round((self.written + len(m.skipped)) / max(self.write_seconds, 1e-9), 1),
        }


# ---------------------------------------------------------------------------------------------------- encode


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group; only the parent handles it (it shuts the pool down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Encoder:
    """Encodes records in order: in this process (workers=1) or in a pool of spawned processes, with a bounded
    number of chunks in flight so memory stays flat however slow the writer (an object store) is."""

    def __init__(self, options: EncodeOptions, workers: int):
        self.options, self.workers = options, workers
        self.pool = None
        if workers > 1:
            # spawn, not fork: the parent may hold threads (tqdm, fsspec's event loop, Ray) that fork would
            # copy mid-use.
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                            initializer=_quiet_worker)

    def map(self, records: list) -> Iterator[Encoded]:
        if self.pool is None:
            for r in records:
                yield encode_record(r, self.options)
            return
        size = max(1, min(64, len(records) // (self.workers * 8)))
        chunks = (records[i:i + size] for i in range(0, len(records), size))
        first = [c for _, c in zip(range(self.workers * 4), chunks)]
        pending = deque(self.pool.submit(encode_chunk, c, self.options) for c in first)
        while pending:
            try:
                done = pending.popleft().result()
            except BrokenProcessPool:
                raise BuildError("an encode worker process died: out of memory, or the calling script has "
                                 "no `if __name__ == '__main__':` guard (workers are spawned and import it "
                                 "again); --workers 1 encodes in this process") from None
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(self.pool.submit(encode_chunk, nxt, self.options))
            yield from done

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


# ----------------------------------------------------------------------------------------------------- build


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="writing shards", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, smoothing=0.1)


def build_shards(source: str | Source, out: str, options: BuildOptions | None = None,
                 classes: list[str] | str | None = None, progress: bool = False) -> BuildResult:
    """Build shards from `source` (a folder, CSV, `fashion-mnist`, or an opened Source) into `out`."""
    options = options or BuildOptions()
    options.check()
    t0 = time.perf_counter()
    src = source if isinstance(source, Source) else open_source(str(source), classes)
    output = prepare_output(out, options.overwrite)
    root = output.root
    plan = plan_splits(src.splits, options.val_fraction, options.limit, options.seed)
    scan_seconds = time.perf_counter() - t0

    encode_options = EncodeOptions(options.max_side, options.quality, options.lossless)
    workers = max(1, min(options.num_workers(), sum(len(r) for r in plan.values())))
    t1 = time.perf_counter()
    total = sum(map(len, plan.values()))
    try:
        splits, skipped = _write_splits(src, plan, output, options, encode_options, workers, total, progress)
    except BaseException:
        output.discard()  # a rebuild that did not finish: the old dataset stays as it was
        raise
    write_seconds = time.perf_counter() - t1

    manifest = Manifest(
        classes=list(src.classes), splits=splits, skipped=skipped, ignored=dict(src.ignored),
        source=f"{src.kind}:{src.location}", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        options={k: v for k, v in asdict(options).items() if k not in ("workers", "overwrite")}
        | {"pillow": _pillow_version()},
    )
    from distrain import storage

    storage.write_json(storage.url_of(out, f"{root}/{INFO_NAME}"),
                       timm_info(manifest, name=root.rstrip("/").rsplit("/", 1)[-1]))
    url = save_manifest(manifest, out)  # the swap: a manifest only ever names complete shards
    output.finish(manifest)             # then the shards it replaced (distrain's, listed by the old manifest)
    storage.mark(out, "shards")
    warnings = [f"class {c!r} has no samples in {split}" for split, info in splits.items()
                for c, n in zip(src.classes, info.class_counts) if n == 0]
    return BuildResult(manifest, url, workers, scan_seconds, write_seconds, warnings)


def _write_splits(src, plan, output, options, encode_options, workers, total, progress):
    splits: dict[str, SplitInfo] = {}
    skipped: list[dict] = []
    with Encoder(encode_options, workers) as encoder, _progress(total, progress) as bar:
        for split, records in plan.items():
            counts = [0] * len(src.classes)
            bar.set_postfix_str(split)
            with ShardWriter(output.fs, f"{output.shard_root}/{split}", options.shard_prefix(split),
                             options.shard_size, options.shard_bytes, url_base=output.url_base(split)) as writer:
                for i, (record, enc) in enumerate(zip(records, encoder.map(records))):
                    bar.update(1)
                    if not enc.ok:
                        skipped.append({"path": record.path, "split": split, "reason": enc.reason})
                        continue
                    meta = {"path": record.path, "label": record.label, "class": src.classes[record.label],
                            "original_size": list(enc.size)}
                    writer.write(f"{split}_{i:07d}", {
                        enc.ext: enc.image,
                        "cls": str(record.label).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                    })
                    counts[record.label] += 1
            splits[split] = SplitInfo(num_samples=sum(counts), shards=writer.shards, class_counts=counts)
    return splits, skipped


def _pillow_version() -> str:
    import PIL

    return PIL.__version__
