"""The worker side: one rank's share of an epoch, read from shard streams, decoded, augmented and batched.

Usage (normally through create_loader; this is what runs inside each DataLoader worker):
    ds = ShardStream(shards, train=True, rank=0, world_size=2, batch_size=64, image_size=224, aug_strength=0.3)
    ds.set_epoch(3)
    for batch in ds: ...          # in the main process this reads as worker 0 of 1

Each worker finds its own WorkerPlan (plan.py) from (rank, worker id, number of workers, epoch) and yields
exactly `plan.batches` whole batches. Training: raw samples pass through a shuffle buffer, then decode; an image
that does not decode is dropped and counted (`Batch.decode_errors`), and a worker that is short of its quota at
the end of its segments reads them again (fresh shuffle and augmentation), so drops never change the step count.
Validation: samples in manifest order, no shuffle, no re-reading; the last batches are padded with `valid=False`.
All randomness comes from one generator seeded by (seed, epoch, rank, worker, num_workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distrain.data.augment import ImageTransform
from distrain.data.decode import DecodeError
from distrain.data.plan import Plan, WorkerPlan, make_plan
from distrain.data.sources import DataError, ShardSet, iter_samples
from distrain.images import IMAGE_KEYS

PAD_LABEL = -1  # label of padding rows (valid=False): indexing with it fails loudly if the mask is forgotten


@dataclass
class Batch:
    """One batch. `images` is uint8 [B, 3, H, W] stored channels_last (NHWC memory), on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor                 # int64 [B]; PAD_LABEL on padding rows
    valid: torch.Tensor                  # bool [B]; False only on validation padding
    keys: list[str]                      # sample keys ('' on padding)
    decode_errors: int = 0               # undecodable samples dropped since this worker's previous batch
    dropped: list[str] = field(default_factory=list)   # their 'shard_url#key'

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def pin_memory(self, device=None) -> Batch:  # called by the DataLoader's pin-memory thread
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(),
                       valid=self.valid.pin_memory())


@dataclass
class WorkerFailure:
    """A DataError raised in a loader worker, sent as an item: the Loader raises it in the main process.

    Sent as data rather than raised, because the DataLoader re-raises worker exceptions wrapped in a traceback
    and then needs 5 s to shut its workers down; this way the user sees the one-line reason at once.
    """

    message: str


class _BatchBuilder:
    def __init__(self, batch_size: int, size: int, shared: bool):
        self.batch_size, self.size, self.shared = batch_size, size, shared
        self._new()

    def _new(self) -> None:
        B, S = self.batch_size, self.size
        self.images = torch.empty((B, S, S, 3), dtype=torch.uint8)
        if self.shared:  # allocate in shared memory now, so sending the batch to the main process copies nothing
            self.images.share_memory_()
        self.array = self.images.numpy()
        self.labels = torch.full((B,), PAD_LABEL, dtype=torch.int64)
        self.keys: list[str] = []

    def add(self, image: np.ndarray, label: int, key: str) -> None:
        i = len(self.keys)
        self.array[i] = image
        self.labels[i] = label
        self.keys.append(key)

    @property
    def full(self) -> bool:
        return len(self.keys) == self.batch_size

    def take(self, decode_errors: int, dropped: list[str]) -> Batch:
        """The batch so far, padded (zeros, PAD_LABEL, valid=False) to batch_size."""
        n = len(self.keys)
        self.array[n:] = 0
        valid = torch.zeros(self.batch_size, dtype=torch.bool)
        valid[:n] = True
        batch = Batch(self.images.permute(0, 3, 1, 2), self.labels, valid, self.keys + [""] * (self.batch_size - n),
                      decode_errors, dropped)
        self._new()
        return batch


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer: hold `size` samples, emit a random one as each new one arrives, then the rest."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """One rank's batches of one split for the current epoch (see the module docstring)."""

    def __init__(self, shards: ShardSet, *, train: bool, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                 image_size: int = 224, aug_strength: float = 0.3, seed: int = 0, epoch: int = 0, limit: int = 0,
                 shuffle_buffer: int = 1000, crop_pct: float = 0.875, num_classes: int | None = None,
                 storage_options: dict | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards, self.train, self.rank, self.world_size = shards, train, rank, world_size
        self.batch_size, self.image_size, self.seed, self.epoch = batch_size, image_size, seed, epoch
        self.limit, self.shuffle_buffer, self.num_classes = limit, shuffle_buffer, num_classes
        self.storage_options = storage_options
        self.transform = ImageTransform(image_size, aug_strength, train=train, crop_pct=crop_pct)
        self.plan()  # fail now (not in a worker) when the split cannot give every rank a batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> Plan:
        s = self.shards
        return make_plan(s.sizes, self.world_size, self.batch_size, self.train, seed=self.seed, epoch=self.epoch,
                         num_samples=s.num_samples, num_shards=len(s.urls), limit=self.limit)

    # ------------------------------------------------------------------------------------------ samples

    def _label(self, sample: dict) -> int:
        url, key = sample["__url__"], sample["__key__"]
        raw = sample.get("cls")
        if raw is None:
            has = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
            raise DataError(f"{url}: sample '{key}' has no .cls label (it has: {has})")
        try:
            label = int(raw.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{url}: sample '{key}': label {raw[:20]!r} is not an integer") from None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise DataError(f"{url}: sample '{key}': label {label} is outside the {self.num_classes} classes")
        return label

    @staticmethod
    def _image(sample: dict) -> tuple[bytes, str]:
        for ext in IMAGE_KEYS:
            if ext in sample:
                return sample[ext], ext
        has = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise DataError(f"{sample['__url__']}: sample '{sample['__key__']}' has no image (.jpg/.png/...; it has: "
                        f"{has})")

    def _read(self, wp: WorkerPlan) -> Iterator[dict]:
        for seg in wp.segments:
            with contextlib.closing(iter_samples(self.shards.urls[seg.shard], seg.start, seg.stop,
                                                 self.storage_options)) as samples:
                yield from samples

    # ------------------------------------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        wp = self.plan().worker(self.rank, worker, num_workers)
        seeds = [self.seed % (1 << 63), self.epoch, self.rank, worker, num_workers]
        try:
            yield from self._batches(wp, np.random.default_rng(seeds), shared=info is not None)
        except DataError as e:
            if info is None:
                raise
            yield WorkerFailure(str(e))

    def _batches(self, wp: WorkerPlan, rng: np.random.Generator, shared: bool) -> Iterator[Batch]:
        builder = _BatchBuilder(self.batch_size, self.image_size, shared)
        good, yielded, errors, dropped = 0, 0, 0, []
        while good < wp.samples:
            before = good
            samples = self._read(wp)
            if self.train and self.shuffle_buffer > 1:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            with contextlib.closing(samples):
                for sample in samples:
                    label = self._label(sample)
                    data, ext = self._image(sample)
                    try:
                        image = self.transform(data, ext, rng)
                    except DecodeError:
                        errors += 1
                        dropped.append(f"{sample['__url__']}#{sample['__key__']}")
                        continue
                    builder.add(image, label, sample["__key__"])
                    good += 1
                    if builder.full:
                        yield builder.take(errors, dropped)
                        yielded, errors, dropped = yielded + 1, 0, []
                    if good == wp.samples:
                        break
            if not wp.cycle:
                break
            if good == before:  # a whole pass without one usable sample: re-reading would loop forever
                urls = sorted({self.shards.urls[s.shard] for s in wp.segments})
                raise DataError(f"no decodable sample in {', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''} "
                                f"({errors} undecodable, the rest empty); cannot fill this worker's {wp.batches} "
                                f"batches")
        while yielded < wp.batches:  # validation: pad to the agreed count (train never gets here)
            yield builder.take(errors, dropped)
            yielded, errors, dropped = yielded + 1, 0, []
