"""The streaming data pipeline: WebDataset shards → equal batches on every DDP rank → normalized on the device.

Usage:
    from distrain.data import create_loader, loader_args, BatchToDevice, Mixup, aug_table
    train = create_loader("s3://bucket/shards", "train", rank=r, world_size=W, batch_size=64, loader_workers=4,
                          image_size=224, aug_strength=0.3, seed=0)
    val = create_loader("s3://bucket/shards", "val", train=False, rank=r, world_size=W, batch_size=128)
    prepare = BatchToDevice(device, mean, std, channels_last=True)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in train:                              # len(train) batches on every rank, all full
            x = prepare(batch)
            ...
    print(aug_table())                                   # what data.aug_strength means

Design (one choice, documented because DDP pipelines hang or skew results when this is left implicit):
- Shard assignment is ours, not WebDataset's splitters: an IterableDataset (dataset.py) in which every loader
  worker computes, from (rank, worker, epoch, seed), which sample ranges of which shards it reads (plan.py).
  Every rank computes the same plan with no communication.
- Train: S = floor(N / (world_size * batch_size)) full batches per rank per epoch, identical on every rank
  whatever the shard count, shard sizes, world size and loader workers; samples_per_epoch = S * W * batch_size.
  The remainder (< W * batch_size samples, the tails of the ranks' slices of the epoch's shuffled sequence) is
  skipped for that epoch only. Without per-shard counts (raw URLs + num_samples) workers resample (cycle) their
  shards up to the same quota. Undecodable images are dropped, counted, and replaced by re-reading.
- Validation: each sample exactly once on exactly one rank; ranks pad to the same batch count (valid=False);
  distrain.metrics adds the counts up, so world sizes 1 and N give the same confusion matrix.
- Shuffling: shard order per (seed, epoch), then a per-worker sample buffer; a run is reproducible for the same
  (seed, epoch, world size, loader workers) and each epoch differs. `loader.position()` is what a checkpoint keeps.
- Reading streams shards through fsspec (local, file://, s3://, gs://, http(s)://); nothing is copied to disk.
  WebDataset's own pieces used here: its tar layout and key convention, and braceexpand for URL patterns.
"""

from distrain.data.augment import aug_params, aug_table
from distrain.data.dataset import PAD_LABEL, Batch
from distrain.data.decode import DecodeError
from distrain.data.device import BatchToDevice, Mixup, to_device
from distrain.data.loader import Loader, check_shards, create_loader, loader_args
from distrain.data.plan import PlanError, make_plan
from distrain.data.sources import DataError, expand_urls, resolve_source
from distrain.data.transform import ImageTransform

__all__ = ["PAD_LABEL", "Batch", "BatchToDevice", "DataError", "DecodeError", "ImageTransform", "Loader", "Mixup",
           "PlanError", "aug_params", "aug_table", "check_shards", "create_loader", "expand_urls", "loader_args",
           "make_plan", "resolve_source", "to_device"]
