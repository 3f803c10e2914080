"""The worker side: one rank's share of an epoch, read from shard streams, decoded, augmented and batched.

Usage (normally through create_loader; this is what runs inside each DataLoader worker):
    ds = ShardStream(shards, train=True, rank=0, world_size=2, batch_size=64, image_size=224, aug_strength=0.3)
    ds.set_epoch(3)
    for batch in ds: ...          # in the main process this reads as worker 0 of 1

Each worker finds its own WorkerPlan (plan.py) from (rank, worker id, number of workers, epoch) and yields
exactly `plan.batches` whole batches, whatever goes wrong with single samples or whole shards:
- an image that does not decode is dropped and counted (`Batch.decode_errors`);
- a shard that cannot be read (damaged, truncated, a read that stalls past `read_timeout` s) is given up for the
  rest of the epoch and named (`Batch.bad_shards`); a remote one is retried `read_retries` times with backoff first;
- training refills: a worker short of its quota reads its segments again (fresh shuffle and augmentation), and if
  none of its shards is readable, the split's other shards; so every rank still takes the planned number of steps;
- validation reads each sample once in manifest order, pads its last batches with `valid=False`, and counts what
  it could not read (`Batch.unreadable`): exact once over what is readable.
All randomness comes from one generator seeded by (seed, epoch, rank, worker, num_workers).

`decode="gpu"`: the worker does not decode JPEGs. It parses their headers and makes every random draw the CPU path
makes, from the same generator, and the batch carries the encoded bytes and those draws (`Batch.encoded`,
`Batch.draws`); the training device decodes and augments them (gpu.py). Other formats are decoded and augmented here
and travel as pixels.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distrain.data.augment import Affine, Draw
from distrain.data.decode import DecodeError
from distrain.data.layout import image_of, label_of
from distrain.data.plan import Plan, Segment, WorkerPlan, make_plan
from distrain.data.sources import DataError, ShardSet, iter_samples
from distrain.data.transform import ImageTransform

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
    bad_shards: list[tuple[str, str]] = field(default_factory=list)  # (url, error) given up since the last batch
    unreadable: int = 0                  # validation: samples of given-up shards, since the last batch
    encoded: list[bytes | None] | None = None   # decode=gpu: a JPEG per row to decode on the device, or None
    draws: list[Draw | None] | None = None      # decode=gpu: that row's random draws

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
    def __init__(self, batch_size: int, size: int, shared: bool, gpu: bool):
        self.batch_size, self.size, self.shared, self.gpu = batch_size, size, shared, gpu
        self._new()

    def _new(self) -> None:
        B, S = self.batch_size, self.size
        self.images = torch.zeros((B, S, S, 3), dtype=torch.uint8)
        if self.shared:  # allocate in shared memory now, so sending the batch to the main process copies nothing
            self.images.share_memory_()
        self.array = self.images.numpy()
        self.labels = torch.full((B,), PAD_LABEL, dtype=torch.int64)
        self.keys: list[str] = []
        self.encoded: list[bytes | None] = []
        self.draws: list[Draw | None] = []

    def add(self, image: np.ndarray | tuple[bytes, Draw], label: int, key: str) -> None:
        i = len(self.keys)
        if isinstance(image, tuple):  # decode=gpu: the JPEG and its draws go to the device as they are
            self.encoded.append(image[0])
            self.draws.append(image[1])
        else:
            self.array[i] = image
            self.encoded.append(None)
            self.draws.append(None)
        self.labels[i] = label
        self.keys.append(key)

    @property
    def full(self) -> bool:
        return len(self.keys) == self.batch_size

    def take(self, decode_errors: int, dropped: list[str], bad: list, unreadable: int = 0) -> Batch:
        """The batch so far, padded (zeros, PAD_LABEL, valid=False) to batch_size."""
        n = len(self.keys)
        valid = torch.zeros(self.batch_size, dtype=torch.bool)
        valid[:n] = True
        pad = self.batch_size - n
        batch = Batch(self.images.permute(0, 3, 1, 2), self.labels, valid, self.keys + [""] * pad,
                      decode_errors, dropped, bad, unreadable,
                      encoded=self.encoded + [None] * pad if self.gpu else None,
                      draws=self.draws + [None] * pad if self.gpu else None)
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
                 storage_options: dict | None = None, affine: Affine | None = None, decode: str = "cpu",
                 read_timeout: float | None = None, read_retries: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be cpu or gpu, got {decode!r}")
        self.shards, self.train, self.rank, self.world_size = shards, train, rank, world_size
        self.batch_size, self.image_size, self.seed, self.epoch = batch_size, image_size, seed, epoch
        self.limit, self.shuffle_buffer, self.num_classes = limit, shuffle_buffer, num_classes
        self.storage_options, self.decode = storage_options, decode
        self.read_timeout, self.read_retries = read_timeout, read_retries
        self.transform = ImageTransform(image_size, aug_strength, train=train, crop_pct=crop_pct, affine=affine)
        self._class_index = {c: i for i, c in enumerate(shards.classes or [])}
        self.plan()  # fail now (not in a worker) when the split cannot give every rank a batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> Plan:
        s = self.shards
        return make_plan(s.sizes, self.world_size, self.batch_size, self.train, seed=self.seed, epoch=self.epoch,
                         num_samples=s.num_samples, num_shards=len(s.urls), limit=self.limit)

    # ------------------------------------------------------------------------------------------ samples

    def _label(self, sample: dict) -> int | None:
        """The sample's class index (None: it has no label, and is dropped and counted like an undecodable one)."""
        layout = self.shards.layout or {}
        found = label_of(sample, layout.get("label", "cls"))
        if found is None:
            return None
        value = found[1]
        if isinstance(value, str):
            index = self._class_index.get(value)
            if index is None:
                raise DataError(f"{sample['__url__']}: sample '{sample['__key__']}': label {value[:40]!r} is not "
                                f"one of the manifest's classes")
            return index
        if value < 0 or (self.num_classes is not None and value >= self.num_classes):
            raise DataError(f"{sample['__url__']}: sample '{sample['__key__']}': label {value} is outside the "
                            f"{self.num_classes} classes")
        return value

    def _image(self, sample: dict) -> tuple[bytes, str] | None:
        ext = image_of(sample, (self.shards.layout or {}).get("image_key", ""))
        return None if ext is None else (sample[ext], ext)

    def _segment(self, seg: Segment, failed: dict[int, str]) -> Iterator[dict]:
        """The samples of one segment; a shard that fails (after retries, for remote ones) lands in `failed` and
        ends the segment early instead of the run."""
        url = self.shards.urls[seg.shard]
        done, attempt = 0, 0
        while True:
            try:
                with contextlib.closing(iter_samples(url, seg.start + done, seg.stop, self.storage_options,
                                                     self.read_timeout)) as samples:
                    for sample in samples:
                        done += 1
                        yield sample
                return
            except DataError as e:
                if "://" in url and not url.startswith("file://") and attempt < self.read_retries:
                    time.sleep(min(8.0, 0.5 * 2 ** attempt))  # a remote hiccup: back off, resume where it broke
                    attempt += 1
                    continue
                failed[seg.shard] = str(e)
                return

    def _read(self, segments: list[Segment], failed: dict[int, str]) -> Iterator[dict]:
        for seg in segments:
            if seg.shard not in failed:
                yield from self._segment(seg, failed)

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

    def _prepare(self, data: bytes, ext: str, rng: np.random.Generator):
        """Decode and augment here, or (decode=gpu, a JPEG) only draw: the device does the rest."""
        if self.decode == "gpu":
            d = self.transform.draw_for(data, ext, rng)
            if d is not None:
                return data, d
        return self.transform(data, ext, rng)

    def _batches(self, wp: WorkerPlan, rng: np.random.Generator, shared: bool) -> Iterator[Batch]:
        builder = _BatchBuilder(self.batch_size, self.image_size, shared, self.decode == "gpu")
        good, yielded, errors, dropped, all_errors = 0, 0, 0, [], 0
        failed: dict[int, str] = {}
        reported: set[int] = set()
        segments = wp.segments
        while good < wp.samples:
            before, failures_before = good, len(failed)
            samples = self._read(segments, failed)
            if self.train and self.shuffle_buffer > 1:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            with contextlib.closing(samples):
                for sample in samples:
                    label, found = self._label(sample), self._image(sample)
                    try:
                        if label is None or found is None:  # no label or no image: as undecodable
                            raise DecodeError("no label" if label is None else "no image")
                        image = self._prepare(found[0], found[1], rng)
                    except DecodeError:
                        errors += 1
                        all_errors += 1
                        dropped.append(f"{sample['__url__']}#{sample['__key__']}")
                        continue
                    builder.add(image, label, sample["__key__"])
                    good += 1
                    if builder.full:
                        bad = [(self.shards.urls[i], failed[i]) for i in failed if i not in reported]
                        reported |= set(failed)
                        yield builder.take(errors, dropped, bad)
                        yielded, errors, dropped = yielded + 1, 0, []
                    if good == wp.samples:
                        break
            if not wp.cycle:
                break
            segments = [s for s in segments if s.shard not in failed]
            if not segments:  # none of this worker's shards reads: refill from the split's other shards
                segments = [Segment(i) for i in range(len(self.shards.urls)) if i not in failed]
            if good == before and (not segments or len(failed) == failures_before):  # a pass that changed nothing
                urls = sorted({self.shards.urls[s.shard] for s in wp.segments})
                problems = "; ".join(f"{self.shards.urls[i]}: {e}" for i, e in list(failed.items())[:3])
                raise DataError(f"no readable, decodable sample in {', '.join(urls[:3])}"
                                f"{' ...' if len(urls) > 3 else ''} ({errors} undecodable"
                                f"{', unreadable shards: ' + problems if problems else ', the rest empty'}); "
                                f"cannot fill this worker's {wp.batches} batches")
        unreadable = wp.samples - good - all_errors if not self.train else 0
        while yielded < wp.batches:  # validation: pad to the agreed count (train never gets here)
            bad = [(self.shards.urls[i], failed[i]) for i in failed if i not in reported]
            reported |= set(failed)
            yield builder.take(errors, dropped, bad, unreadable)
            yielded, errors, dropped, unreadable = yielded + 1, 0, [], 0
