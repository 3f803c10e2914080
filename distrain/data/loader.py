"""create_loader: a rank's DataLoader over a shard split, with equal steps on every rank and a resumable position.

Usage:
    from distrain.data import create_loader
    loader = create_loader("data/fashion-mnist", "train", rank=rank, world_size=world, batch_size=64,
                           loader_workers=2, image_size=64, aug_strength=0.3, seed=0)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)                       # before iterating: reseeds shard order, buffer, augmentation
        for batch in loader:                          # exactly len(loader) batches, on every rank
            ...
        loader.decode_errors, loader.dropped          # undecodable samples of this epoch (counted, named)
    state = loader.position()                         # {'epoch': e, 'seed': s, ...} for the checkpoint

A DataLoader (worker processes with one thread each) is built per epoch, so set_epoch always reaches the workers;
starting processes per epoch costs milliseconds against epochs of minutes. Workers decode and batch; the main
process only receives finished uint8 batches (pinned when CUDA is present).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from distrain.data.dataset import Batch, ShardStream, WorkerFailure
from distrain.data.decode import single_threaded
from distrain.data.plan import PlanError, make_plan
from distrain.data.sources import DataError, resolve_source


def _worker_init(_: int) -> None:
    single_threaded()


class Loader:
    """Iterable of Batch for one rank; `len()` is the same on every rank (see distrain.data.plan)."""

    def __init__(self, dataset: ShardStream, loader_workers: int = 1, pin_memory: bool | None = None,
                 prefetch_factor: int = 2, multiprocessing_context: Any = None, timeout: float = 0):
        self.dataset = dataset
        self.loader_workers = max(0, int(loader_workers))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.timeout = timeout               # seconds the main process waits for a worker's next batch (0 = forever)
        self.decode_errors = 0               # this epoch so far
        self.dropped: list[str] = []         # 'shard_url#key' of this epoch's undecodable samples
        self.bad_shards: dict[str, str] = {}  # url → error of the shards given up this epoch
        self.unreadable = 0                  # validation: samples of given-up shards this epoch

    # ---------------------------------------------------------------------------------------- properties

    @property
    def classes(self) -> list[str] | None:
        return self.dataset.shards.classes

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def samples_per_epoch(self) -> int:
        """Train: samples consumed per epoch across all ranks. Val: samples evaluated (each exactly once)."""
        return self.dataset.plan().samples_per_epoch

    def __len__(self) -> int:
        return self.dataset.plan().batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(int(epoch))

    def position(self) -> dict:
        """What a resumed run needs to continue the same sequence of epochs."""
        d = self.dataset
        return {"epoch": d.epoch, "seed": d.seed, "world_size": d.world_size, "batch_size": d.batch_size,
                "samples_per_epoch": self.samples_per_epoch, "batches_per_epoch": len(self)}

    # ---------------------------------------------------------------------------------------- iteration

    def _dataloader(self) -> DataLoader:
        workers = self.loader_workers
        return DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          worker_init_fn=_worker_init if workers else None,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          multiprocessing_context=self.multiprocessing_context if workers else None,
                          timeout=self.timeout if workers else 0, persistent_workers=False)

    def __iter__(self) -> Iterator[Batch]:
        self.decode_errors, self.dropped, self.bad_shards, self.unreadable = 0, [], {}, 0
        expected, count = len(self), 0
        batches = iter(self._dataloader())
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                d = self.dataset
                raise DataError(f"rank {d.rank}: a loader worker produced no batch for {self.timeout:g} s (batch "
                                f"{count + 1} of {expected}; reading split shards of {d.shards.location}): a hang "
                                f"below the shard reader's own timeout, e.g. in a decoder") from None
            if isinstance(batch, WorkerFailure):
                raise DataError(batch.message)
            self.decode_errors += batch.decode_errors
            self.dropped.extend(batch.dropped)
            self.bad_shards.update(dict(batch.bad_shards))
            self.unreadable += batch.unreadable
            count += 1
            yield batch
        if count != expected:  # the plan guarantees this; a mismatch would hang DDP, so never continue silently
            raise RuntimeError(f"rank {self.dataset.rank} yielded {count} batches, the plan says {expected}")


def create_loader(source: Any, split: str = "train", *, train: bool = True, rank: int = 0, world_size: int = 1,
                  batch_size: int = 64, loader_workers: int = 1, image_size: int = 224, aug_strength: float = 0.3,
                  seed: int = 0, epoch: int = 0, limit: int = 0, shuffle_buffer: int = 1000,
                  num_samples: int | None = None, crop_pct: float = 0.875, storage_options: dict | None = None,
                  pin_memory: bool | None = None, check_urls: bool = True, multiprocessing_context: Any = None,
                  timeout: float = 0, affine=None, decode: str = "cpu", read_timeout: float | None = None,
                  read_retries: int = 0) -> Loader:
    """A rank's Loader over `split` of `source`.

    source: a shards folder or manifest.json (path or fsspec URL), a Manifest, or shard URLs (a list, a brace
        pattern such as 's3://b/train-{000000..000099}.tar'). Raw URL lists are counted once here unless
        `num_samples` is given (training then resamples, see plan.py; validation always counts).
    train: True = shuffled, augmented, equal full batches; False = manifest order, center crop, exact once with
        padding (`Batch.valid`).
    limit: use at most this many samples per epoch, taken from every shard in proportion (0 = all).
    crop_pct: evaluation (and strength 0) crop = this fraction of the shorter side, resized to image_size.
    affine: the always-on augment.Affine (train only). decode: `cpu`, or `gpu` (workers only read and draw).
    read_timeout / read_retries: every shard read bounded; remote shards retried (see dataset.py).
    timeout: seconds to wait for a worker's next batch before the epoch fails (0 = no limit).
    Missing shards fail here, naming the URL. Every rank must pass the same arguments except `rank`.
    """
    if isinstance(source, Path):
        source = str(source)
    if not train and num_samples is not None:
        num_samples = None  # exact-once validation needs per-shard counts: always count raw URL lists
    shards = resolve_source(source, split, num_samples=num_samples, storage_options=storage_options,
                            check=check_urls)
    dataset = ShardStream(shards, train=train, rank=rank, world_size=world_size, batch_size=batch_size,
                          image_size=image_size, aug_strength=aug_strength, seed=seed, epoch=epoch, limit=limit,
                          shuffle_buffer=shuffle_buffer, crop_pct=crop_pct,
                          num_classes=len(shards.classes) if shards.classes else None,
                          storage_options=storage_options, affine=affine if train else None, decode=decode,
                          read_timeout=read_timeout, read_retries=read_retries)
    if loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {loader_workers}")
    return Loader(dataset, loader_workers, pin_memory=pin_memory, multiprocessing_context=multiprocessing_context,
                  timeout=timeout)


def check_shards(source: Any, split: str = "train", *, world_size: int = 1, loader_workers: int = 1,
                 batch_size: int = 64, limit: int = 0, num_samples: int | None = None,
                 storage_options: dict | None = None, check_urls: bool = False) -> dict:
    """Pre-flight check on the driver, before any worker starts: can `split` give every rank a full batch?

    Raises PlanError (a ValueError) saying how many samples are needed; returns the epoch's figures. Any number
    of shards works (ranges of one shard can go to different workers), so the shard count is reported, not
    required. `check_urls` also checks that every shard exists.
    """
    shards = resolve_source(source, split, num_samples=num_samples, storage_options=storage_options,
                            check=check_urls)
    try:
        plan = make_plan(shards.sizes, world_size, batch_size, True, num_samples=shards.num_samples,
                         num_shards=len(shards.urls), limit=limit)
    except PlanError as e:
        raise PlanError(f"{shards.location or source}: split '{split}': {e}") from None
    workers = world_size * max(1, loader_workers)
    return {"num_shards": len(shards.urls), "num_samples": plan.num_samples, "batches_per_rank": plan.batches_per_rank,
            "samples_per_epoch": plan.samples_per_epoch, "skipped_per_epoch": plan.num_samples - plan.samples_per_epoch,
            "resampled": plan.resampled, "loader_processes": workers,
            "idle_loader_workers_per_rank": max(0, max(1, loader_workers) - plan.batches_per_rank)}


def loader_args(cfg, *, rank: int, world_size: int, image_size: int, crop_pct: float, train: bool,
                seed: int | None = None, epoch: int = 0, aug_strength: float | None = None,
                decode: str = "cpu") -> dict:
    """create_loader's arguments for `cfg` (the one place the config's data section meets the loader): the train
    split (shuffled, augmented, `data.train_limit`) or the val split (manifest order, exact once, `data.val_limit`).
    Every caller (the training loop, its torchrun twin, the benchmarks) builds its loaders from this. `decode` is
    data.decode resolved for the device (`auto` → cpu or gpu)."""
    from distrain.data.augment import Affine

    d = cfg.data
    return {"split": d.train_split if train else d.val_split, "train": train, "rank": rank, "world_size": world_size,
            "affine": Affine.from_config(d.affine), "decode": decode, "read_timeout": d.read_timeout_s,
            "read_retries": d.read_retries, "timeout": max(300.0, 3 * d.read_timeout_s) if d.loader_workers else 0,
            "batch_size": d.batch_size, "loader_workers": d.loader_workers, "image_size": image_size,
            "seed": cfg.train.seed if seed is None else seed, "epoch": epoch if train else 0,
            "shuffle_buffer": d.shuffle_buffer, "crop_pct": crop_pct,
            "aug_strength": (d.aug_strength if aug_strength is None else aug_strength) if train else 0.0,
            "limit": d.train_limit if train else d.val_limit}
