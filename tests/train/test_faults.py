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
from distrain.train import TrainingError, fit
from tests.helpers import fast_train_overrides


def _worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # the address named: with several Ray instances on the machine the state API cannot tell which is meant
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True, raise_on_missing_output=False,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
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


# ----------------------------------------------------------------------------------------------- damaged shards


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".distrain*"))
    return dst


def _pax_shard_with_zero_length_record(path: Path) -> None:
    """Rewrite a shard in PAX format and set its first PAX record's length to 0 (one flipped byte pair): the
    record that made the old reader loop forever."""
    import io
    import tarfile

    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            if i == len(members) // 2:
                info.pax_headers = {"comment": "damaged"}
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    at = raw.index(b" comment=damaged")
    start = at - 2  # the record is "NN comment=damaged\n"; NN is its length
    assert raw[start:at].isdigit()
    raw[start:at] = b"00"
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(300)
def test_truncated_and_zero_length_pax_shards_are_skipped_listed_and_steps_stay_equal(ray_cluster, tiny_shards,
                                                                                       tmp_path):
    shards = _copy_shards(tiny_shards, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [s["url"] for s in manifest["splits"]["train"]["shards"]]
    cut, pax = shards / urls[1], shards / urls[3]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])  # a copy cut short
    _pax_shard_with_zero_length_record(pax)
    cfg = load_config(None, fast_train_overrides(shards, tmp_path, name="damaged", **{
        "train.epochs": 1, "data.max_bad_shards": 2, "data.read_timeout_s": 10}))
    t0 = time.monotonic()
    summary = fit(cfg)
    assert time.monotonic() - t0 < 120  # no hang: the old reader spun forever on the PAX record
    skipped = summary["skipped_shards"]
    assert len(skipped) == 2 and skipped == summary["history"][0]["skipped_shards"]
    assert any(str(cut) in s for s in skipped) and any(str(pax) in s and "PAX" in s for s in skipped), skipped
    # Every rank took the planned number of steps: the refill kept the DDP ranks in lockstep.
    meta = json.loads((Path(summary["best_checkpoint"]) / "meta.json").read_text())
    assert meta["global_step"] == meta["data_position"]["batches_per_epoch"] > 0
    assert summary["replicas_in_sync"] is True

    # Beyond data.max_bad_shards (default: 1% of 6 shards, at least 1) the run stops and names them all.
    strict = cfg.replace({"data.max_bad_shards": -1, "train.name": "strict"})
    with pytest.raises(TrainingError, match=r"2 unreadable shards, more than data.max_bad_shards=1") as err:
        fit(strict)
    assert str(cut) in str(err.value) and str(pax) in str(err.value)


class _StallingHTTP:
    """A loopback HTTP server that serves files, except that requests for `stall` are accepted and never
    answered (a server or proxy that hangs)."""

    def __init__(self, root: Path, stall: str):
        import functools
        import http.server

        stop = self.stop_event = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith(stall):
                    stop.wait(120)
                    return
                super().do_GET()

            def do_HEAD(self):
                if self.path.endswith(stall):
                    stop.wait(120)
                    return
                super().do_HEAD()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop_event.set()
        self.server.shutdown()


@pytest.mark.timeout(120)
def test_a_read_that_never_returns_ends_within_the_timeout_naming_the_shard(tiny_shards, tmp_path):
    """A shard on a server that accepts and never answers, and a FIFO where a shard should be: each read ends
    within data.read_timeout_s, the shard is named and skipped, and the rank still gets all its batches."""
    import os as _os

    from distrain.data import create_loader

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    urls = [s["url"] for s in manifest["splits"]["train"]["shards"]]
    server = _StallingHTTP(tiny_shards, stall=urls[2])
    try:
        remote = [f"{server.url}/{u}" for u in urls]
        sizes = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
        loader = create_loader(remote, "train", batch_size=8, loader_workers=0, image_size=16, aug_strength=0.0,
                               num_samples=sum(sizes), read_timeout=2.0, read_retries=0, check_urls=False)
        t0 = time.monotonic()
        batches = list(loader)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert len(batches) == len(loader)
    assert list(loader.bad_shards) == [remote[2]] and "2" in loader.bad_shards[remote[2]]
    assert elapsed < 30, elapsed

    fifo_dir = _copy_shards(tiny_shards, tmp_path / "fifo")
    target = fifo_dir / urls[0]
    target.unlink()
    _os.mkfifo(target)  # opening it for reading would block until a writer comes: it never does
    loader = create_loader(str(fifo_dir), "train", batch_size=8, loader_workers=0, image_size=16,
                           aug_strength=0.0, read_timeout=2.0, check_urls=False)
    t0 = time.monotonic()
    assert len(list(loader)) == len(loader)
    assert time.monotonic() - t0 < 30
    assert list(loader.bad_shards) == [str(target)] and "not a regular file" in loader.bad_shards[str(target)]


# ----------------------------------------------------------------------------------------------- stopping


@pytest.mark.timeout(300)
def test_a_stop_ends_every_rank_after_one_step_finishes_wandb_as_stopped_and_the_rerun_resumes(
        ray_cluster, tiny_shards, tmp_path):
    from distrain.tracking import offline_runs
    from distrain.train.control import RunHandle
    from tests.wandb_offline import read_offline_run

    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="stopped", **{
        "train.epochs": 3, "wandb.mode": "offline", "data.image_size": 48}))
    run_dir = tmp_path / "stopped"
    handle = RunHandle()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=fit(cfg, handle=handle)), daemon=True)
    thread.start()
    _wait_for(run_dir / "checkpoint_epoch_0001")
    handle.stop("test")
    stopped_at = time.monotonic()
    thread.join(timeout=120)
    assert "summary" in result
    took = time.monotonic() - stopped_at
    summary = result["summary"]
    assert summary["status"] == "stopped" and summary["stop_reason"] == "test"
    assert summary["epochs"] < 3 and took < 30, (summary["epochs"], took)
    runs = offline_runs(run_dir / "wandb")
    assert len(runs) == 1
    wb = read_offline_run(runs[0], wait_s=20)
    assert wb.summary.get("status") == "stopped" and wb.exit_code == 0  # finished, not cut off

    # The same command resumes after the last checkpoint and finishes the epochs.
    done = fit(cfg)
    assert done["status"] == "ok" and [h["epoch"] for h in done["history"]] == [1, 2, 3]
    assert len(offline_runs(run_dir / "wandb")) == 2 and {read_offline_run(r).run.get("id") for r in
                                                          offline_runs(run_dir / "wandb")} == {wb.run.get("id")}


# ----------------------------------------------------------------------------------------------- killed driver


def _snapshot_has(run_dir: Path, name: str) -> bool:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return name in snap.read_text()
    except OSError:
        return False


@pytest.mark.timeout(400)
def test_sigkilled_driver_then_the_same_command_resumes_in_its_phase(ray_cluster, tiny_shards, tmp_path):
    """`distrain train` killed with SIGKILL in phase 2 (of a head-first, then-deeper recipe); the same command
    again resumes in phase 2 after the last checkpoint instead of starting over."""
    import subprocess
    import sys

    import ray

    overrides = fast_train_overrides(tiny_shards, tmp_path, name="killed_driver", **{
        "train.epochs": 4, "data.image_size": 48, "train.keep_checkpoints": 4, "model.unfreeze_depth": 0})
    command = [sys.executable, "-m", "distrain", "train"]
    for k, v in overrides.items():
        command += ["--set", f"{k}={v}"]
    command += ["--set", "train.phases=[{epochs: 1}, {epochs: 3, model.unfreeze_depth: 2, optim.lr: 0.001}]"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    run_dir = tmp_path / "killed_driver"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not _snapshot_has(run_dir, "checkpoint_epoch_0002") and first.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
        log.close()
    kept = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("checkpoint_epoch_000[12]")}
    assert set(kept) == {"checkpoint_epoch_0001", "checkpoint_epoch_0002"}
    deadline = time.monotonic() + 60
    while _worker_pids():  # the killed driver's workers go with it (Ray ends what the dead process owned)
        assert time.monotonic() < deadline, "the killed driver's workers are still alive"
        time.sleep(0.5)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "resuming at epoch 3" in out, out[-3000:]
    # the console of a 2-worker `distrain train` (issue 19): distrain's lines only, printed by the driver
    from tests.test_console import assert_quiet_console

    assert_quiet_console(second, run_dir, epochs=(3, 4), total=4)
    assert "is gone" in out  # its lock was recognised as left by a dead process and taken over
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    assert [h["phase"] for h in summary["history"]] == [1, 2, 2, 2]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("checkpoint_epoch_000[12]")} == kept  # not redone
    meta = json.loads((run_dir / "checkpoint_epoch_0004" / "meta.json").read_text())
    assert meta["phase"] == 1 and meta["global_step"] == 4 * len_per_epoch(meta)


# ----------------------------------------------------------------------------------------------- stalled W&B


class _Stalling:
    """A loopback TCP server that accepts every connection and never sends a byte."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open, never answered

    def close(self):
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.timeout(300)
def test_a_stalled_wandb_server_costs_nothing_one_offline_run_and_one_warning(ray_cluster, tiny_shards, tmp_path,
                                                                              monkeypatch, capfd):
    from distrain.tracking import offline_runs
    from tests.wandb_offline import read_offline_run

    server = _Stalling()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key of the right shape: W&B then tries the server
    try:
        cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="stalled_wandb", **{
            "train.epochs": 1, "wandb.mode": "online", "wandb.base_url": server.url, "wandb.init_timeout": 8.0,
            "wandb.finish_timeout": 5.0}))
        t0 = time.monotonic()
        summary = fit(cfg)
        took = time.monotonic() - t0
    finally:
        server.close()
    assert summary["epochs"] == 1 and took < 120
    runs = offline_runs(tmp_path / "stalled_wandb" / "wandb")
    assert len(runs) == 1  # exactly one run, offline, to sync later
    wb = read_offline_run(runs[0], wait_s=20)
    assert wb.exit_code == 0 and len([h for h in wb.history if "val/top1" in h]) == 1
    out = capfd.readouterr()
    text = out.out + out.err
    assert text.count("did not answer") == 1, text[-3000:]
    assert "k" * 40 not in text


# ----------------------------------------------------------------------------------------------- storage


def _make_read_only(folder: Path) -> bool:
    """Make a folder refuse new entries: chattr +i as root (who ignores permissions), chmod otherwise. Returns
    whether it worked (a probe write fails)."""
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    else:
        folder.chmod(0o555)
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def _make_writable(folder: Path) -> None:
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.mark.timeout(400)
def test_storage_turning_read_only_mid_run_is_named_and_the_last_checkpoint_resumes(ray_cluster, tiny_shards,
                                                                                    tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="readonly", **{
        "train.epochs": 4, "data.image_size": 48}))
    run_dir = tmp_path / "readonly"
    result: dict = {}

    def target():
        try:
            result["summary"] = fit(cfg)
        except TrainingError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    # once Ray Train recorded checkpoint 1 (its snapshot comes a little after the checkpoint: epoch 2 may be done by
    # then, so the folder turns read-only after epoch 1, 2 or 3 of 4)
    while not _snapshot_has(run_dir, "checkpoint_epoch_0001"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if not _make_read_only(run_dir):
        thread.join(120)
        pytest.skip("this machine cannot make a folder read-only for this user (no chattr +i, or root-like chmod)")
    try:
        thread.join(timeout=240)
    finally:
        _make_writable(run_dir)
    assert "error" in result, result
    # One error naming the run folder, the cause and the checkpoint a rerun resumes from. Which write fails first
    # depends on timing: rank 0's next checkpoint (CheckpointWriteError, naming the epoch), or Ray Train's
    # controller writing its snapshot.
    import re

    err = result["error"]
    assert "Operation not permitted" in err or "PermissionError" in err, err
    named = re.search(rf"resume from its last checkpoint, {re.escape(str(run_dir))}/(checkpoint_epoch_\d{{4}})", err)
    assert named, err
    good = named.group(1)
    assert (run_dir / good / "meta.json").exists() and good < "checkpoint_epoch_0004", err
    failed = re.search(r"cannot write the epoch (\d) checkpoint", err)
    if failed:
        assert f"the last good checkpoint is {run_dir / good}" in err, err
    before = json.loads((run_dir / good / "meta.json").read_text())["history"]

    summary = fit(cfg)  # writable again: the same command resumes from the last good checkpoint
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    # its epochs up to the checkpoint are the first attempt's, timings included: resumed, not trained again
    def same(h):
        return [(e["epoch"], e["train_loss"], e["images_per_s"], e["first_step_at"]) for e in h]

    assert same(summary["history"][:len(before)]) == same(before)
