"""Who reads what: the equal-steps rule for training and the exact-once rule for validation.

Usage:
    from distrain.data.plan import make_plan
    plan = make_plan(sizes=[1, 3, 50, 7, 200], world_size=3, batch_size=8, train=True, seed=0, epoch=2)
    plan.batches_per_rank        # 10 = floor(261 / (3 * 8)), the same on every rank
    plan.samples_per_epoch       # 240 = 10 * 3 * 8
    plan.worker(rank=1, worker=0, num_workers=2)   # WorkerPlan(segments=[Segment(shard=4, start=.., stop=..)], ...)

The rule (train, shard sizes known, e.g. from the manifest):
    N = samples in the split (after `limit`), S = floor(N / (world_size * batch_size)) batches per rank.
    Every epoch the shard order is permuted with (seed, epoch); the permuted shards, laid end to end, form a
    cycle of N samples, and the epoch starts at a position of it drawn with (seed, epoch). Rank r owns the slice
    [floor(r N / W), floor((r+1) N / W)) of the epoch's sequence and reads the first S * batch_size samples of
    its slice; those are split between its loader workers in whole batches (worker k gets S // K batches, plus
    one if k < S % K). The remainder, fewer than batch_size + 1 samples at the tail of each rank's slice
    (< W * batch_size in all), is skipped this epoch; the random start moves it, so every sample is equally
    likely to be skipped and none is skipped every epoch. Slices cut through shards, so any number of shards
    works, including fewer shards than ranks x workers: two workers then read different ranges of one shard.

Train, shard sizes unknown (a raw URL list plus the total `num_samples`): resampling. Global worker g of T =
    W * K reads shards order[g::T] (or, with fewer shards than T, all shards starting at g mod n), cycling through
    them until it has its quota of batches. Same step count on every rank; samples may repeat within an epoch.

Validation (exact once): the shards in manifest order form the sequence; rank r owns the slice
    [floor(r N / W), floor((r+1) N / W)) and every rank yields V = ceil(ceil(N / W) / batch_size) batches. A rank
    whose slice is shorter pads its last batch(es) with samples marked invalid, so each sample is seen exactly
    once across ranks and workers, and every rank runs the same number of steps.

This module is pure arithmetic (no I/O), so the rule is unit-tested over thousands of cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class PlanError(ValueError):
    """A split that cannot give every rank a batch: the message says what is needed."""


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard `shard` (an index into the URL list); stop None = to the shard's end."""

    shard: int
    start: int = 0
    stop: int | None = None


@dataclass
class WorkerPlan:
    """What one loader worker of one rank reads in one epoch."""

    segments: list[Segment]
    batches: int            # batches this worker yields (train: all full; val: the last ones may be padded)
    samples: int            # real samples to yield (train: batches * batch_size; val: <= that)
    cycle: bool = False     # train: re-read the segments until `samples` are decoded (drops, resampling)


def stratified_limit(sizes: list[int], limit: int) -> list[int]:
    """Per-shard sample counts that sum to min(limit, sum(sizes)), proportional to the sizes.

    Largest-remainder rounding, ties broken by shard index, so the result is deterministic.
    """
    total = sum(sizes)
    if limit <= 0 or limit >= total:
        return list(sizes)
    exact = [s * limit / total for s in sizes]
    counts = [int(e) for e in exact]
    short = limit - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:short]:
        counts[i] += 1
    return counts


def shard_order(num_shards: int, num_samples: int, seed: int, epoch: int, shuffle: bool) -> tuple[list[int], int]:
    """The epoch's (shard order, start position): seeded by (seed, epoch), identical on every rank."""
    if not shuffle:
        return list(range(num_shards)), 0
    rng = np.random.default_rng([seed % (1 << 63), epoch, 0x5EED])
    order = [int(i) for i in rng.permutation(num_shards)]
    return order, int(rng.integers(num_samples)) if num_samples > 0 else 0


def even_slice(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when `total` items are cut into `parts` slices whose sizes differ by <= 1."""
    return index * total // parts, (index + 1) * total // parts


def batch_split(batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """(first batch, batch count) of `worker`: whole batches, counts differing by <= 1, larger counts first.

    Larger counts first matters: the DataLoader takes batches from its workers round-robin, so the sequence of
    batches is gap-free and ends when the last worker runs out.
    """
    base, extra = divmod(batches, num_workers)
    first = worker * base + min(worker, extra)
    return first, base + (1 if worker < extra else 0)


def segments_for(order: list[int], sizes: list[int], lo: int, hi: int, start: int = 0) -> list[Segment]:
    """The pieces of shards covering positions [lo, hi) of the cycle of shards laid end to end in `order`,
    counted from position `start` of the cycle (so a range may wrap around its end)."""
    n = sum(sizes)
    if n and (start + hi > n):
        a, b = (start + lo) % n, (start + hi) % n or n
        if a < b and hi - lo < n:
            return segments_for(order, sizes, a, b)
        return segments_for(order, sizes, a, n) + segments_for(order, sizes, 0, b)
    out: list[Segment] = []
    lo, hi = lo + start, hi + start
    pos = 0
    for shard in order:
        n = sizes[shard]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Segment(shard, a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return out


@dataclass
class Plan:
    """One epoch's assignment of samples to (rank, worker), for the whole job (every rank computes the same)."""

    sizes: list[int] | None       # per-shard samples used (after limit); None = unknown (resampling)
    num_samples: int              # N: samples in the split used per epoch's sequence (after limit)
    world_size: int
    batch_size: int
    train: bool
    seed: int = 0
    epoch: int = 0
    num_shards: int = 0
    order: list[int] = field(default_factory=list)
    start: int = 0                # where the epoch starts in the cycle of ordered shards (train, sizes known)

    def __post_init__(self):
        if self.sizes is not None:
            self.num_shards = len(self.sizes)
        self.order, self.start = shard_order(self.num_shards, self.num_samples if self.sizes is not None else 0,
                                             self.seed, self.epoch, shuffle=self.train)

    @property
    def resampled(self) -> bool:
        return self.sizes is None

    @property
    def batches_per_rank(self) -> int:
        W, B, N = self.world_size, self.batch_size, self.num_samples
        if self.train:
            return N // (W * B)
        per_rank = -(-N // W)  # ceil(N / W): the longest rank slice
        return -(-per_rank // B)

    @property
    def samples_per_epoch(self) -> int:
        """Train: samples consumed per epoch over all ranks. Val: real samples evaluated (= N, exactly once)."""
        if self.train:
            return self.batches_per_rank * self.world_size * self.batch_size
        return self.num_samples

    def worker(self, rank: int, worker: int, num_workers: int) -> WorkerPlan:
        if not (0 <= rank < self.world_size and 0 <= worker < num_workers):
            raise ValueError(f"rank {rank}/{self.world_size}, worker {worker}/{num_workers} out of range")
        B, S = self.batch_size, self.batches_per_rank
        first, count = batch_split(S, num_workers, worker)
        if self.resampled:  # train only (validation always knows its sizes)
            g, T, n = rank * num_workers + worker, self.world_size * num_workers, self.num_shards
            shards = self.order[g::T] if n >= T else self.order[g % n:] + self.order[:g % n]
            return WorkerPlan([Segment(s) for s in shards], count, count * B, cycle=True)
        lo, hi = even_slice(self.num_samples, self.world_size, rank)
        a = lo + first * B
        b = min(hi, a + count * B)
        if self.train:
            assert b - a == count * B  # S * B <= floor(N / W): a train slice always holds its quota
        segs = segments_for(self.order, self.sizes, a, b, self.start) if a < b else []
        return WorkerPlan(segs, count, max(0, b - a), cycle=self.train)


def make_plan(sizes: list[int] | None, world_size: int, batch_size: int, train: bool, seed: int = 0,
              epoch: int = 0, num_samples: int | None = None, num_shards: int | None = None,
              limit: int = 0) -> Plan:
    """The epoch's plan. Give `sizes` (per shard), or for train `num_samples` and `num_shards` (resampling)."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    if sizes is not None:
        sizes = stratified_limit(list(sizes), limit)
        n = sum(sizes)
        plan = Plan(sizes, n, world_size, batch_size, train, seed, epoch)
    else:
        if not train:
            raise ValueError("validation needs per-shard sample counts (a manifest, or counted shards)")
        if num_samples is None or not num_shards:
            raise ValueError("without per-shard sizes, give num_samples and the shards")
        n = min(num_samples, limit) if limit > 0 else num_samples
        plan = Plan(None, n, world_size, batch_size, train, seed, epoch, num_shards=num_shards)
    if train and plan.batches_per_rank == 0:
        raise PlanError(f"{n} training samples cannot give each of {world_size} rank(s) one full batch of "
                        f"{batch_size}: need at least {world_size * batch_size} samples (lower the batch size "
                        f"or the number of workers, or raise the limit)")
    return plan
