"""Which record goes to which split, in which order: stratified, seeded, reproducible.

Usage:
    from distrain.shards.split import plan_splits
    plan = plan_splits(source.splits, val_fraction=0.1, limit=0, seed=0)
    {name: len(records) for name, records in plan.items()}      # {'train': 900, 'val': 100}

- The val split takes `round(n_c × val_fraction)` records of every class c (at least one, and never all, of
  any class with two or more), so every class is represented in both. Sources with their own val split keep
  it.
- `limit` keeps at most that many records per split with the class proportions of the split (largest
  remainder; every class keeps at least one when the limit allows).
- Each split is then shuffled: a streaming reader only shuffles within a buffer, so shards written in class
  order would feed a training run one class at a time.
Every random choice comes from a generator seeded by (seed, purpose): one seed gives one plan on any machine.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode())])


def _by_class(records: list) -> dict[int, list]:
    groups: dict[int, list] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return dict(sorted(groups.items()))


def stratified_split(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) with `fraction` of every class in val."""
    if fraction <= 0:
        return list(records), []
    rng = rng_for(seed, "val-split")
    train, val = [], []
    for group in _by_class(records).values():
        n = len(group)
        n_val = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        order = rng.permutation(n)
        val.extend(group[i] for i in sorted(order[:n_val]))
        train.extend(group[i] for i in sorted(order[n_val:]))
    return train, val


def class_quotas(counts: dict[int, int], limit: int) -> dict[int, int]:
    """Share `limit` among classes in proportion to `counts` (largest remainder), each ≥ 1 if it allows."""
    total = sum(counts.values())
    if limit >= total:
        return dict(counts)
    floor = 1 if limit >= len(counts) else 0
    quotas = {c: min(n, max(floor, int(limit * n // total))) for c, n in counts.items()}
    remainders = sorted(counts, key=lambda c: (-(limit * counts[c] / total - limit * counts[c] // total), c))
    left = limit - sum(quotas.values())
    while left > 0:  # hand out what is left, biggest remainder first, to classes that still have records
        progressed = False
        for c in remainders:
            if left and quotas[c] < counts[c]:
                quotas[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    while left < 0:  # the floor of 1 overshot: take back from the biggest quotas
        c = max(quotas, key=lambda k: (quotas[k], -k))
        quotas[c] -= 1
        left += 1
    return quotas


def stratified_limit(records: list, limit: int, seed: int, purpose: str) -> list:
    """At most `limit` records, keeping the class proportions."""
    if not limit or len(records) <= limit:
        return list(records)
    rng = rng_for(seed, f"limit-{purpose}")
    groups = _by_class(records)
    quotas = class_quotas({c: len(g) for c, g in groups.items()}, limit)
    out = []
    for c, group in groups.items():
        keep = sorted(rng.permutation(len(group))[:quotas[c]])
        out.extend(group[i] for i in keep)
    return out


def shuffled(records: list, seed: int, purpose: str) -> list:
    order = rng_for(seed, f"shuffle-{purpose}").permutation(len(records))
    return [records[i] for i in order]


def plan_splits(splits: dict[str, list], val_fraction: float, limit: int, seed: int) -> dict[str, list]:
    """The records of every output split, in write order. Splits left empty are dropped."""
    splits = dict(splits)
    if "val" not in splits:
        splits["train"], val = stratified_split(splits["train"], val_fraction, seed)
        if val:
            splits["val"] = val
    plan = {}
    for name in ("train", "val", "test"):
        if splits.get(name):
            plan[name] = shuffled(stratified_limit(splits[name], limit, seed, name), seed, name)
    return plan
