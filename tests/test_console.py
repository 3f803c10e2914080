"""The console a person reads: `distrain train` prints distrain's lines only (from the driver), Ray's output goes to
the run folder's ray.log, `-v` brings Ray's stream back, a failure in a worker shows its error and the log's path;
curves.png is drawn. Real subprocesses of the CLI, joining this session's Ray cluster as a user's command would
(a complete quiet run is checked by assert_quiet_console, on the second run of test_faults' killed-driver test)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, fast_train_overrides

RAY_NOISE = ("TrainingReport", "PreemptionWatcher", "(RayTrainWorker", "(TrainController", "A run snapshot was found",
             "Checkpoint successfully created", "Setting up process group")


def _cli(args: list[str], ray_cluster, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, "-m", "distrain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def assert_quiet_console(out: subprocess.CompletedProcess, run: Path, epochs: tuple[int, ...], total: int) -> None:
    """What a 2-worker `distrain train` prints (tests/train/test_faults.py runs one to completion): at most 60
    non-empty lines, none of Ray's; the start block and one line per epoch from the driver; the JSON last; the
    run folder's curves.png and ray.log."""
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) <= 60, "\n".join(lines)
    assert not [ln for ln in lines if any(n in ln for n in RAY_NOISE)], "\n".join(lines)
    shown = [ln.split(":")[0] for ln in lines if ln.startswith("[distrain] epoch ") and "val_top1" in ln]
    assert shown == [f"[distrain] epoch {e}/{total}" for e in epochs], "\n".join(lines)
    assert any("2 worker(s) on cpu" in ln for ln in lines)  # the start block, printed by the driver
    assert json.loads(out.stdout.strip().splitlines()[-1])["epochs"] == total  # the summary JSON: the last line
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run / "ray.log").read_text()
    assert "RayTrainWorker" in log and "TrainController" in log  # Ray's own output, kept in the run folder


@pytest.mark.timeout(300)
def test_a_failure_in_a_worker_shows_its_error_and_the_log_and_v_shows_rays_stream(ray_cluster, tiny_shards,
                                                                                   tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    first = shards / manifest["splits"]["val"]["shards"][0]["url"]
    with tarfile.open(first) as tar:  # a label beyond the 3 classes: the worker's validation raises
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            if m.name.endswith(".cls"):
                data = b"7"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    overrides = fast_train_overrides(shards, tmp_path, name="fails", **{"train.epochs": 1})
    quiet = _cli(["train", *_sets(overrides)], ray_cluster)
    assert quiet.returncode == 2
    text = quiet.stdout + quiet.stderr
    assert "label 7 is outside the 3 classes" in text, text[-3000:]
    assert f"Ray's output of the run: {tmp_path / 'fails' / 'ray.log'}" in text
    assert "label 7 is outside" in (tmp_path / "fails" / "ray.log").read_text()
    assert "(RayTrainWorker" not in text
    loud = _cli(["train", "-v", *_sets(overrides)], ray_cluster)
    assert loud.returncode == 2 and "(RayTrainWorker" in loud.stdout + loud.stderr
