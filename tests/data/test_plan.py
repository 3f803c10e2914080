"""The plan: equal steps on every rank and exact-once validation, as pure arithmetic over thousands of cases."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from distrain.data import PlanError, make_plan
from distrain.data.plan import stratified_limit


def test_plan_gives_equal_steps_and_exact_once_coverage():
    """Pure arithmetic over many cases: quotas, disjoint ranges, exact-once validation coverage."""
    for sizes in ([1, 3, 50, 7, 200], [5, 17, 2, 9], [100], [0, 4, 0, 13], [2] * 40):
        for W in (1, 2, 3, 4):
            for K in (1, 2, 3):
                for bs in (1, 4, 8):
                    for train in (True, False):
                        N = sum(sizes)
                        if train and N < W * bs:
                            with pytest.raises(PlanError, match=f"at least {W * bs} samples"):
                                make_plan(sizes, W, bs, train)
                            continue
                        plan = make_plan(sizes, W, bs, train, seed=3, epoch=W)
                        seen = Counter()
                        for r in range(W):
                            wps = [plan.worker(r, k, K) for k in range(K)]
                            assert sum(wp.batches for wp in wps) == plan.batches_per_rank
                            for wp in wps:
                                got = sum(seg.stop - seg.start for seg in wp.segments)
                                assert got == wp.samples <= wp.batches * bs
                                if train:
                                    assert wp.samples == wp.batches * bs
                                for seg in wp.segments:
                                    assert 0 <= seg.start < seg.stop <= sizes[seg.shard]
                                    seen.update((seg.shard, i) for i in range(seg.start, seg.stop))
                        assert max(seen.values(), default=1) == 1  # no sample twice in an epoch
                        if train:
                            assert plan.batches_per_rank == N // (W * bs)
                            assert sum(seen.values()) == plan.samples_per_epoch == N // (W * bs) * W * bs
                        else:
                            assert plan.batches_per_rank == math.ceil(math.ceil(N / W) / bs)
                            assert sum(seen.values()) == N == plan.samples_per_epoch
    assert stratified_limit([1, 3, 50, 7, 200], 100) == [0, 1, 19, 3, 77]
    assert sum(stratified_limit([10, 10, 10], 7)) == 7


def test_resampled_plan_without_sizes_gives_every_worker_shards():
    plan = make_plan(None, world_size=3, batch_size=8, train=True, num_samples=261, num_shards=2)
    assert plan.batches_per_rank == 10
    for r in range(3):
        for k in range(3):  # 9 workers, 2 shards: everyone still gets shards to cycle through
            wp = plan.worker(r, k, 3)
            assert wp.segments and wp.cycle
    with pytest.raises(ValueError, match="per-shard"):
        make_plan(None, 2, 8, train=False, num_samples=100, num_shards=2)
