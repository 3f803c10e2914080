"""The consuming side of data.engine=ray_data: one rank's split of a Ray Dataset as the step core's loader.

Usage (on a Train worker, train/loop.py):
    make_loader = shard_loaders(ingest, clock, rank, world)   # core.setup(..., make_loader=make_loader)
    loader = RayDataLoader(ray.train.get_dataset_shard("train"), params, N, classes, rank, world, clock)
    loader.set_epoch(e); for batch in loader: ...              # exactly len(loader) full batches (train)

The Loader interface (len, set_epoch, position, iteration into data.Batch, per-epoch decode_errors / dropped /
bad_shards / unreadable), so the step core cannot tell the engines apart. Every wait for a batch is bounded, and
rank 0 tells the read side which epoch it is before iterating (data/ray_data.py explains why).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from distrain.data.dataset import Batch
from distrain.data.ray_data import CLOCK_TIMEOUT_S, IngestParams
from distrain.data.sources import DataError


@dataclass
class RayDataLoader:
    """One rank's split of a Ray Dataset, with the Loader interface the step core uses (len, set_epoch, position,
    iteration into Batch, per-epoch decode_errors / dropped / bad_shards / unreadable)."""

    iterator: object                        # ray.data.DataIterator: ray.train.get_dataset_shard(name)
    p: IngestParams
    num_samples: int                        # N of the split (after data.*_limit)
    classes: list[str] | None
    rank: int = 0
    world_size: int = 1
    clock: object = None                    # rank 0 posts its epoch here before iterating (module doc)
    epoch: int = 0
    decode_errors: int = 0
    dropped: list[str] = field(default_factory=list)
    bad_shards: dict[str, str] = field(default_factory=dict)
    unreadable: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node id → rows decoded there, this epoch

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def samples_per_epoch(self) -> int:
        return len(self) * self.world_size * self.p.batch_size if self.p.train else self.num_samples

    def __len__(self) -> int:
        W, B, N = self.world_size, self.p.batch_size, self.num_samples
        if self.p.train:
            return N // (W * B)
        return math.ceil(math.ceil(N / W) / B)  # val: an estimate (ranks get what Ray Data sends them)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def position(self) -> dict:
        return {"epoch": self.epoch, "seed": self.p.seed, "world_size": self.world_size,
                "batch_size": self.p.batch_size, "samples_per_epoch": self.samples_per_epoch,
                "batches_per_epoch": len(self)}

    def _batches(self) -> Iterator[dict]:
        shuffle = self.p.shuffle_buffer if self.p.train and self.p.shuffle_buffer > 1 else None
        return self.iterator.iter_batches(
            batch_size=self.p.batch_size, batch_format="numpy", drop_last=self.p.train,
            prefetch_batches=self.p.prefetch_batches, local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=hash((self.p.seed, self.epoch, self.rank)) % (1 << 31) if shuffle else None)

    def _bounded(self) -> Iterator[dict]:
        """The batches, each wait bounded by p.wait_timeout (a thread feeds a small queue)."""
        q: queue.Queue = queue.Queue(maxsize=2)
        done = object()
        stop = threading.Event()

        def feed():
            try:
                for b in self._batches():
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:
                q.put(e)

        threading.Thread(target=feed, daemon=True, name="distrain-ray-data").start()
        try:
            while True:
                try:
                    item = q.get(timeout=self.p.wait_timeout)
                except queue.Empty:
                    raise DataError(f"rank {self.rank}: Ray Data delivered no batch for {self.p.wait_timeout:g} s "
                                    f"(epoch {self.epoch + 1}): are there free CPUs for its decode tasks"
                                    f"{' on nodes labelled ' + self.p.node_label if self.p.node_label else ''}?"
                                    ) from None
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def __iter__(self) -> Iterator[Batch]:
        import ray

        self.decode_errors, self.dropped, self.bad_shards, self.unreadable, self.nodes = 0, [], {}, 0, {}
        if self.p.train and self.clock is not None and self.rank == 0:
            ray.get(self.clock.set_data_epoch.remote(self.epoch), timeout=CLOCK_TIMEOUT_S)
        count, expected = 0, len(self)
        for b in self._bounded():
            if self.p.train and len(b["epoch"]) and int(b["epoch"][0]) != self.epoch:
                raise DataError(f"rank {self.rank}: Ray Data delivered epoch {int(b['epoch'][0]) + 1}'s rows while "
                                f"the run is in epoch {self.epoch + 1} (the data clock and the run disagree)")
            dropped = [d for d in b["dropped"] if d]
            for text in b["bad"]:
                for line in (text or "").split("\n"):
                    if line:
                        url, _, err = line.partition("\t")
                        self.bad_shards[url] = err
            for node in b["node"]:
                self.nodes[node] = self.nodes.get(node, 0) + 1
            unreadable = int(np.sum(b["unreadable"]))
            self.decode_errors += len(dropped)
            self.dropped += dropped
            self.unreadable += unreadable
            # copies: Ray hands out read-only views of its object store, and the step loop owns its batches
            images = torch.from_numpy(np.array(b["image"], dtype=np.uint8)).permute(0, 3, 1, 2)
            yield Batch(images, torch.from_numpy(np.array(b["label"], dtype=np.int64)),
                        torch.from_numpy(np.array(b["valid"], dtype=bool)), [str(k) for k in b["key"]],
                        decode_errors=len(dropped), dropped=dropped, unreadable=unreadable)
            count += 1
        if self.p.train and count != expected:  # equal=True makes this impossible; never continue silently
            raise RuntimeError(f"rank {self.rank} got {count} batches from Ray Data, the rule says {expected}")




def shard_loaders(ingest: dict, clock, rank: int, world_size: int):
    """The step core's `make_loader` on a Train worker: this rank's splits of the run's `train` and `val` Datasets.
    `ingest` = {'train': IngestParams, 'val': IngestParams, 'num_samples': {'train': N, 'val': N}}."""
    import ray.train

    def make(manifest, args: dict) -> RayDataLoader:
        name = "train" if args["train"] else "val"
        return RayDataLoader(ray.train.get_dataset_shard(name), ingest[name], ingest["num_samples"][name],
                             list(manifest.classes), rank, world_size, clock)

    return make
