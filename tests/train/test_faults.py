"""Faults injected from outside, as users meet them: processes killed with SIGKILL, damaged shards, stuck reads.

No hooks in the code under test: a worker is killed by its pid (found through Ray's state API), a shard is damaged
on disk, a read blocks on a FIFO. Each test says what was kept and what was lost.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from distrain.config import load_config
from distrain.train import fit
from tests.helpers import fast_train_overrides


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True,
                         raise_on_missing_output=False)
    return sorted(int(a.pid) for a in actors if a.pid)


def _wait_for(path: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.timeout(400)
def test_sigkilled_worker_is_replaced_and_the_run_resumes_from_its_last_checkpoint(ray_cluster, tiny_shards,
                                                                                    tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="faulty", **{
        "train.max_failures": 1, "train.epochs": 5, "data.image_size": 48, "train.keep_checkpoints": 5}))
    run_dir = tmp_path / "faulty"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=fit(cfg)), daemon=True)
    thread.start()
    _wait_for(run_dir / "checkpoint_epoch_0002")  # killed in epoch 3, after two checkpoints
    pids = _worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)  # as the OOM killer or a spot reclaim would
    killed_at = time.monotonic()
    thread.join(timeout=300)
    assert "summary" in result, "the run did not finish after its worker was killed"
    summary = result["summary"]
    assert summary["epochs"] == 5 and [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5]
    assert summary["replicas_in_sync"] is True
    # Resumed from the last checkpoint, not from the start: epoch 1 and 2 were trained once (their checkpoints are
    # older than the kill), and the optimizer state carried over (AdamW's step count is the run's global step).
    mtimes = {p.name: p.stat().st_mtime for p in run_dir.glob("checkpoint_epoch_*")}
    assert set(mtimes) == {f"checkpoint_epoch_000{e}" for e in range(1, 6)}
    last = run_dir / "checkpoint_epoch_0005"
    meta = json.loads((last / "meta.json").read_text())
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {meta["global_step"]}
    assert meta["global_step"] == 5 * len_per_epoch(meta)
    assert time.monotonic() - killed_at < 240  # recovered in bounded time
    assert _worker_pids() == []  # nothing left behind


def len_per_epoch(meta: dict) -> int:
    return meta["data_position"]["batches_per_epoch"]
