"""W&B tracking: real wandb offline runs written by distrain's tracker, read back from their `.wandb` record logs.

No network: every run here is offline, or online against a closed port on 127.0.0.1 (the failure tests).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrain import tracking
from distrain.config import load_config
from distrain.redact import redact
from distrain.tracking.charts import confusion_chart
from tests.wandb_offline import OfflineRun, read_offline_run

CLASSES = ["cat", "dog", "eel"]
FAKE_KEY = "f" * 8 + "distrainfakekey0123456789abcdef01"  # 40 characters, like a real W&B key


def _cfg(tmp_path, **overrides):
    return load_config(None, {"scaling.storage_path": str(tmp_path / "runs"), "wandb.mode": "offline",
                              "wandb.max_misclassified": 2, "train.tags": ["demo", "cpu"], **overrides})


def _start(cfg, name: str, rank: int = 0, run_dir: str | None = None, job_type: str = "train",
           group: str | None = None):
    """A tracker for the run `name` (a run is its config: name, job type and group are config keys)."""
    cfg = cfg.replace({"train.name": name, "train.job_type": job_type, "train.group": group or ""})
    return tracking.start_tracker(cfg, rank=rank, run_dir=run_dir)


def _misclassified(rng, n=3):
    return [(0.95 - 0.1 * i, f"val/{i:04d}", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), i % 3, (i + 1) % 3)
            for i in range(n)]


def _epoch_metrics(epoch, top1):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "lr": 1e-3, "images_per_s": 120.0, "val_loss": 0.9 / epoch,
            "val_top1": top1, "val_top5": 1.0, "val_count": 30, "decode_errors": 0,
            "val_per_class_acc": {"cat": top1, "dog": 0.5, "eel": 0.25}}


def _only_run(wandb_folder) -> OfflineRun:
    runs = tracking.offline_runs(wandb_folder)
    assert len(runs) == 1, runs
    return read_offline_run(runs[0], wait_s=20)


def _table_rows(run: OfflineRun, key: str) -> list[dict]:
    """The rows of every logged table `key` (one per epoch), read from the run's files/ folder."""
    out = []
    for row in run.history:
        if key in row:
            table = run.table(row[key]["path"])
            out.append([dict(zip(table["columns"], r, strict=True)) for r in table["data"]])
    return out


def _staged_images(run: OfflineRun, key: str) -> list[tuple[np.ndarray, list]]:
    """(decoded image, the other cells) of the last `key` table, from the run-table artifact holding its images."""
    art = [a for a in run.artifacts if a["type"] == "run_table" and f"{key}.table.json" in a["files"]][-1]
    table_file = art["files"][f"{key}.table.json"]
    table = json.loads(Path(table_file).read_text())
    rows = []
    for image, *rest in table["data"]:
        local = art["files"][image["path"]]
        assert Path(local).is_relative_to(run.path.parent), "staged images stay in the run's wandb folder"
        rows.append((np.asarray(Image.open(local)), rest))
    return rows


@pytest.mark.timeout(60)
def test_offline_run_holds_config_steps_epochs_confusion_misclassified_and_summary(tmp_path):
    cfg = _cfg(tmp_path, **{"train.name": "exp1"})
    run_dir = str(tmp_path / "runs" / "exp1")
    rng = np.random.default_rng(0)
    wrong = _misclassified(rng)
    tracker = _start(cfg, "exp1", job_type="train", group=None, rank=0, run_dir=run_dir)
    assert tracker.enabled
    for step in (1, 2, 3):
        tracker.log_step(step, {"train/loss": 1.0 / step, "train/lr": 1e-3 * step, "train/images_per_s": 50.0,
                                "epoch": step / 4})
    confusions = [[[5, 3, 2], [1, 6, 3], [0, 3, 7]], [[8, 1, 1], [1, 8, 1], [0, 2, 8]]]
    tracker.log_epoch(1, _epoch_metrics(1, 0.6), confusions[0], CLASSES, wrong)
    tracker.log_epoch(2, _epoch_metrics(2, 0.8), confusions[1], CLASSES, wrong)
    tracker.finish({"best_val_top1": 0.8, "best_epoch": 2, "status": "ok"})
    tracker.finish({"status": "failed"})  # idempotent: the second call changes nothing

    wandb_folder = Path(run_dir) / "wandb"
    assert tracking.wandb_dir(cfg, run_dir) == str(wandb_folder)
    run = _only_run(wandb_folder)
    assert tracker.sync_command == f"wandb sync {run.path}"
    assert tracker.offline_dir == str(run.path)
    assert run.run["id"] == tracking.run_id("distrain", run_dir)
    assert (run.run["job_type"], run.run["name"], run.run["tags"]) == ("train", "exp1", ["demo", "cpu"])
    # The resolved config, flattened: every leaf of the config tree is there with its value.
    for key, value in cfg.flat().items():
        assert run.config[key] == value, key
    assert run.config["distrain.run_dir"] == run_dir

    steps = [h for h in run.history if "train/step" in h]
    assert [h["train/step"] for h in steps] == [1, 2, 3]
    assert [h["train/loss"] for h in steps] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [h["train/epoch"] for h in steps] == pytest.approx([0.25, 0.5, 0.75])
    epochs = [h for h in run.history if "val/top1" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["val/top1"] for h in epochs] == [0.6, 0.8]
    assert [h["val/loss"] for h in epochs] == pytest.approx([0.9, 0.45])
    assert [h["val/top5"] for h in epochs] == [1.0, 1.0]
    assert [h["val/per_class_acc/cat"] for h in epochs] == [0.6, 0.8]
    assert [h["val/per_class_acc/eel"] for h in epochs] == [0.25, 0.25]
    assert [h["epoch/train_loss"] for h in epochs] == [1.0, 0.5]

    # The confusion matrix chart's table: one row per (true, predicted) cell with its count.
    tables = _table_rows(run, "val/confusion_matrix_table")
    assert len(tables) == 2
    for table, matrix in zip(tables, confusions, strict=True):
        got = {(r["Actual"], r["Predicted"]): r["nPredictions"] for r in table}
        assert got == {(CLASSES[i], CLASSES[j]): matrix[i][j] for i in range(3) for j in range(3)}

    # Misclassified images: capped at wandb.max_misclassified, most confident first, with the real pixels.
    mis = _table_rows(run, "val/misclassified")[-1]
    assert [(r["key"], r["true"], r["predicted"], r["confidence"]) for r in mis] == [
        ("val/0000", "cat", "dog", 0.95), ("val/0001", "dog", "eel", pytest.approx(0.85))]
    images = _staged_images(run, "val/misclassified")
    assert len(images) == 2
    for (pixels, rest), (_conf, key, original, _t, _p) in zip(images, wrong[:2], strict=True):
        assert rest[0] == key
        np.testing.assert_array_equal(pixels, original)

    assert run.summary["best_val_top1"] == 0.8
    assert run.summary["best_epoch"] == 2
    assert run.summary["status"] == "ok"
    assert run.exit_code == 0


@pytest.mark.timeout(60)
def test_resumed_run_continues_the_same_wandb_run_and_other_runs_get_their_own(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = str(tmp_path / "runs" / "same name, odd chars: é/ü")
    for epoch in (1, 2):  # a run, then its resumption after a failure
        t = _start(cfg, "r", run_dir=run_dir)
        t.log_epoch(epoch, _epoch_metrics(epoch, 0.5 * epoch), None, CLASSES, [])
        t.finish()
    runs = [read_offline_run(p, wait_s=20) for p in tracking.offline_runs(tracking.wandb_dir(cfg, run_dir))]
    assert len(runs) == 2
    assert runs[0].run["id"] == runs[1].run["id"] == tracking.run_id("distrain", run_dir)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", runs[0].run["id"])
    assert [h["epoch"] for r in runs for h in r.history if "val/top1" in h] == [1, 2]
    other = tracking.run_id("distrain", str(tmp_path / "runs" / "other"))
    assert other != runs[0].run["id"]
    assert tracking.run_id("another-project", run_dir) != runs[0].run["id"]
    hint = tracking.sync_hint(cfg, run_dir)
    assert hint.endswith(tracking.sync_command([r.path for r in runs])) and hint.count("offline-run-") == 2
    # A wandb.dir shared by several runs: each run finds its own folders only.
    shared = _cfg(tmp_path, **{"wandb.dir": str(tmp_path / "shared")})
    for name in ("a", "b"):
        _start(shared, name, run_dir=str(tmp_path / "runs" / name)).finish()
    assert len(tracking.offline_runs(tmp_path / "shared" / "wandb")) == 2
    mine = tracking.offline_runs(tmp_path / "shared", tracking.run_id("distrain", str(tmp_path / "runs" / "a")))
    assert len(mine) == 1 and tracking.sync_hint(shared, str(tmp_path / "runs" / "a")).endswith(str(mine[0]))
    assert tracking.sync_hint(cfg, str(tmp_path / "runs" / "never-ran")) is None


def test_mode_follows_config_then_environment():
    cfg = load_config(None)
    assert tracking.resolve_mode(cfg, {}) == "offline"
    assert tracking.resolve_mode(cfg, {"WANDB_API_KEY": FAKE_KEY}) == "online"
    assert tracking.resolve_mode(cfg, {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}) == "offline"
    assert tracking.resolve_mode(cfg, {"WANDB_MODE": "dryrun"}) == "offline"
    assert tracking.resolve_mode(cfg, {"WANDB_DISABLED": "true", "WANDB_API_KEY": FAKE_KEY}) == "disabled"
    for mode in ("online", "offline", "disabled"):
        forced = load_config(None, {"wandb.mode": mode})
        assert tracking.resolve_mode(forced, {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}) == mode


@pytest.mark.timeout(30)
def test_disabled_mode_and_other_ranks_write_nothing(tmp_path):
    for cfg, rank in ((_cfg(tmp_path, **{"wandb.mode": "disabled"}), 0), (_cfg(tmp_path), 1)):
        t = _start(cfg, "quiet", rank=rank, run_dir=str(tmp_path / "runs" / "quiet"))
        assert not t.enabled and t.sync_command is None
        t.log_step(1, {"train/loss": 1.0})
        t.log_epoch(1, _epoch_metrics(1, 0.5), [[1]], ["a"], [])
        t.finish({"status": "ok"})
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)
def test_wandb_server_that_does_not_answer_warns_once_and_logs_offline(tmp_path, monkeypatch, capsys):
    """Online against a closed port on loopback, with a key: wandb retries until init_timeout, gives up, and the
    run is recorded offline instead (same run id, for `wandb sync` later), with one warning saying so."""
    import wandb

    from tests.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    wandb.teardown()  # a fresh wandb singleton that sees this environment
    cfg = _cfg(tmp_path, **{"wandb.mode": "online", "wandb.base_url": "http://127.0.0.1:9", "wandb.init_timeout": 1})
    try:
        t = _start(cfg, "down", run_dir=str(tmp_path / "runs" / "down"))
        assert t.enabled
        t.log_step(1, {"train/loss": 1.0})
        t.log_epoch(1, _epoch_metrics(1, 0.5), [[1, 0], [0, 1]], ["a", "b"], [])
        t.finish({"status": "ok"})
        t.finish()
    finally:
        monkeypatch.delenv("WANDB_API_KEY")
        wandb.teardown()
    err = capsys.readouterr().err
    assert err.count("[distrain] warning: W&B server http://127.0.0.1:9 did not answer") == 1, err
    assert "CommError" in err  # it reached for the (closed) server, then gave up: not a missing-key error
    assert "wandb sync" in err and FAKE_KEY not in err
    runs = tracking.offline_runs(tmp_path / "runs" / "down" / "wandb")
    assert len(runs) == 1
    run = read_offline_run(runs[0], wait_s=10)
    assert run.exit_code == 0 and run.summary["status"] == "ok" and any("train/loss" in h for h in run.history)
    assert "WANDB_DATA_DIR" not in os.environ


@pytest.mark.timeout(60)
def test_a_failing_log_call_warns_once_and_turns_tracking_off(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    run_dir = str(tmp_path / "runs" / "bad")
    t = _start(cfg, "bad", run_dir=run_dir)
    t.log_step(1, {"train/loss": 1.0})
    broken = [(0.9, "k", np.zeros((2, 2, 2, 2, 2), np.uint8), 0, 1)]  # not an image: wandb.Image raises
    t.log_epoch(1, _epoch_metrics(1, 0.5), [[1, 0], [0, 1]], ["a", "b"], broken)
    assert not t.enabled
    t.log_step(2, {"train/loss": 0.5})
    t.log_epoch(2, _epoch_metrics(2, 0.6), None, ["a", "b"], broken)
    t.finish({"status": "ok"})
    err = capsys.readouterr().err
    assert err.count("[distrain] warning:") == 1, err
    assert "tracking is off for the rest of this run" in err
    run = _only_run(Path(run_dir) / "wandb")
    assert [h.get("train/step") for h in run.history] == [1]  # what came before the failure is kept
    assert run.exit_code == 0


def test_redaction_of_credentials():
    secrets = [FAKE_KEY]
    assert redact(f"prefix-{FAKE_KEY}-suffix", secrets) == "prefix-<redacted>-suffix"
    assert redact("s3://AKIAXX:hunter2@bucket/shards", []) == "s3://<redacted>@bucket/shards"
    url = "https://host/w.pth?X-Amz-Signature=abc&X-Amz-Credential=def&size=3&access_token=ghi"
    assert redact(url, []) == ("https://host/w.pth?X-Amz-Signature=<redacted>&X-Amz-Credential=<redacted>"
                                        "&size=3&access_token=<redacted>")
    assert redact({"a": ["gs://u:p@b/x", 3]}, []) == {"a": ["gs://<redacted>@b/x", 3]}
    assert redact("data/fashion-mnist", []) == "data/fashion-mnist"


@pytest.mark.timeout(60)
def test_api_key_and_credentials_never_reach_any_file(tmp_path, monkeypatch):
    """A key in the environment of an offline run, credentials in the config: no file W&B writes holds them."""
    import wandb

    home = Path(os.environ["HOME"])
    aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    wandb.teardown()
    cfg = _cfg(tmp_path, **{"data.shards": f"s3://AKIAEXAMPLE:{aws_secret}@bucket/shards",
                            "model.weights": "https://host/w.pth?token=tok123456789"})
    run_dir = str(tmp_path / "runs" / "secret")
    try:
        t = _start(cfg, "secret", run_dir=run_dir)
        assert t.enabled
        t.log_step(1, {"train/loss": 1.0})
        t.log_epoch(1, _epoch_metrics(1, 0.5), [[1, 0], [0, 1]], ["a", "b"],
                    _misclassified(np.random.default_rng(1), 1))
        t.finish({"status": "ok"})
    finally:
        monkeypatch.delenv("WANDB_API_KEY")
        wandb.teardown()
    run = _only_run(Path(run_dir) / "wandb")
    assert run.config["data.shards"] == "s3://<redacted>@bucket/shards"
    assert run.config["model.weights"] == "https://host/w.pth?token=<redacted>"
    files = [p for p in [*Path(run_dir).rglob("*"), *(home / ".cache" / "wandb").rglob("*")] if p.is_file()]
    assert len(files) > 5
    for p in files:
        data = p.read_bytes()
        for secret in (FAKE_KEY, aws_secret, "tok123456789"):
            assert secret.encode() not in data, f"{secret[:6]}... found in {p}"


@pytest.mark.timeout(60)
def test_sweep_summary_is_one_run_with_the_trial_table_and_the_best(tmp_path):
    cfg = _cfg(tmp_path)
    sweep_dir = str(tmp_path / "runs" / "sw")
    rows = [{"trial": f"t{i}", "optim.lr": 10.0 ** -i, "model.unfreeze_depth": d, "val_top1": acc, "epochs": 2,
             "status": "TERMINATED"} for i, (d, acc) in enumerate([(0, 0.5), ("all", 0.9), (2, 0.7)], start=1)]
    best = {"trial": "t2", "val_top1": 0.9, "config": {"optim.lr": 0.01, "model.unfreeze_depth": "all"}}
    tracking.log_sweep_summary(cfg.replace({"tune.name": "sw"}), rows, best, sweep_dir)
    run = _only_run(Path(sweep_dir) / "wandb")
    assert (run.run["job_type"], run.run["group"], run.run["name"]) == ("sweep", "sw", "sw")
    (table,) = _table_rows(run, "sweep/trials")
    assert [r["trial"] for r in table] == ["t1", "t2", "t3"]
    assert [r["val_top1"] for r in table] == [0.5, 0.9, 0.7]
    assert [r["model.unfreeze_depth"] for r in table] == ["0", "all", "2"]  # mixed column kept as text
    assert run.summary["best/trial"] == "t2"
    assert run.summary["best/val_top1"] == 0.9
    assert run.summary["best/config/optim.lr"] == 0.01
    assert run.summary["num_trials"] == 3


@pytest.mark.timeout(60)
def test_three_trial_trackers_make_three_runs_in_the_sweep_group(tmp_path):
    cfg = _cfg(tmp_path)
    for i in range(3):
        t = _start(cfg, f"trial_{i}", job_type="trial", group="sweepA",
                                   run_dir=str(tmp_path / "runs" / "sweepA" / f"trial_{i}"))
        t.log_epoch(1, _epoch_metrics(1, 0.1 * i), None, CLASSES, [])
        t.finish()
    runs = [read_offline_run(p, wait_s=20) for p in sorted((tmp_path / "runs").rglob("offline-run-*"))]
    assert len(runs) == 3
    assert {r.run["group"] for r in runs} == {"sweepA"}
    assert {r.run["job_type"] for r in runs} == {"trial"}
    assert len({r.run["id"] for r in runs}) == 3


@pytest.mark.timeout(60)
def test_model_artifact_is_logged_to_the_training_run(tmp_path):
    model_dir = tmp_path / "runs" / "m" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"\0" * 64)
    (model_dir / "model.json").write_text('{"classes": ["a", "b"]}')
    run_dir = str(tmp_path / "runs" / "m")
    off = _cfg(tmp_path, **{"train.name": "m"})
    assert tracking.log_model_artifact(off, str(model_dir), run_dir=run_dir) is None  # off
    cfg = _cfg(tmp_path, **{"wandb.log_model": True})
    named = cfg.replace({"train.name": "m"})
    assert tracking.log_model_artifact(named, str(model_dir), run_dir=run_dir) == "m-model"
    run = _only_run(Path(run_dir) / "wandb")
    assert run.run["id"] == tracking.run_id("distrain", run_dir)  # the training run's W&B run
    (art,) = [a for a in run.artifacts if a["type"] == "model"]
    assert art["name"] == "m-model"
    assert set(art["files"]) == {"model.safetensors", "model.json"}
    assert Path(art["files"]["model.json"]).read_text() == '{"classes": ["a", "b"]}'

    # A model folder on remote storage (fsspec's in-memory filesystem stands in for s3://) is fetched first.
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe({"/remote-run/model/model.json": b'{"classes": ["x"]}', "/remote-run/model/w.bin": b"\1" * 8})
    remote = _cfg(tmp_path, **{"wandb.log_model": True, "wandb.dir": str(tmp_path / "w")})
    assert tracking.log_model_artifact(remote.replace({"train.name": "remote-run"}), "memory://remote-run/model",
                                       run_dir="memory://remote-run") == "remote-run-model"
    (art,) = _only_run(tmp_path / "w").artifacts
    assert {k: Path(v).read_bytes() for k, v in art["files"].items()} == {
        "model.json": b'{"classes": ["x"]}', "w.bin": b"\1" * 8}


@pytest.mark.timeout(60)
def test_remote_run_folder_gets_a_local_wandb_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    run_dir = "s3://bucket/runs/remote-run"
    local = tracking.wandb_dir(cfg, run_dir)
    assert local.startswith(str(tmp_path / "cache" / "distrain" / "wandb"))
    t = _start(cfg, "remote-run", run_dir=run_dir)
    t.finish()
    assert f"go to the local folder {local}" in capsys.readouterr().out
    assert _only_run(local).run["id"] == tracking.run_id("distrain", run_dir)
    # An explicit local wandb.dir wins; a remote one gets the same local folder.
    assert tracking.wandb_dir(_cfg(tmp_path, **{"wandb.dir": str(tmp_path / "w")}), run_dir) == str(
        tmp_path / "w" / "wandb")
    assert tracking.wandb_dir(_cfg(tmp_path, **{"wandb.dir": "gs://b/w"}), run_dir) == local


def test_large_label_sets_stay_within_table_limits():
    n = 120  # 14,400 cells: more than a W&B table holds
    confusion = np.eye(n, dtype=int) * 5
    confusion[0, 1] = 2
    chart = confusion_chart(confusion.tolist(), [f"c{i}" for i in range(n)])
    rows = chart.table.data
    assert len(rows) == n + 1  # the non-zero cells only
    assert rows[0] == ["c0", "c0", 5] and ["c0", "c1", 2] in rows


_AUDIT_SCRIPT = r"""
import sys

log = open(sys.argv[1], "a")


def audit(event, args):  # every name lookup and connection this process makes, W&B's own threads included
    if event == "socket.getaddrinfo":
        log.write(f"{args[0]}\n")
    elif event == "socket.connect":
        log.write(f"{args[1][0] if isinstance(args[1], tuple) else args[1]}\n")
    else:
        return
    log.flush()


sys.addaudithook(audit)
import numpy as np
from distrain import tracking
from distrain.config import load_config

cfg = load_config(None, {"wandb.max_misclassified": 1, "train.name": "net"})  # wandb.mode auto, no key: offline
assert tracking.resolve_mode(cfg) == "offline"
t = tracking.start_tracker(cfg, run_dir=sys.argv[2])
t.log_step(1, {"train/loss": 1.0})
t.log_epoch(1, {"epoch": 1, "val_top1": 0.5}, [[1, 1], [0, 2]], ["a", "b"],
            [(0.9, "k", np.zeros((8, 8, 3), np.uint8), 0, 1)])
t.finish({"status": "ok"})
"""


@pytest.mark.timeout(60)
def test_an_offline_run_stays_on_this_machine(tmp_path):
    """Default settings, no key: offline, and no name lookup or connection leaves loopback (W&B's own error
    telemetry would reach for the W&B cloud if the offline mode were only passed to wandb.init)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    log = tmp_path / "net.log"
    run_dir = tmp_path / "runs" / "net"
    proc = subprocess.run([sys.executable, "-c", _AUDIT_SCRIPT, str(log), str(run_dir)], env=env, check=False,
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert len(tracking.offline_runs(run_dir / "wandb")) == 1
    targets = set(log.read_text().split()) if log.exists() else set()
    assert targets <= {"127.0.0.1", "localhost", "::1"} | {t for t in targets if t.startswith("/")}, targets


# ------------------------------------------------------------------------------------------------ through training
#
# Real 2-worker training runs on the session Ray cluster. The driver runs in a subprocess that joins that cluster
# with a job runtime environment, because that is how a key reaches the workers on a cluster (`ray job submit
# --runtime-env`, `distrain submit`) and the only way to give one run's workers an environment of their own.

_DRIVER = r"""
import json
import sys

import ray

from distrain.config import load_config
from distrain.train import fit

address, overrides, env_vars = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
summary = fit(load_config(None, overrides))
print("SUMMARY " + json.dumps(summary, default=str), flush=True)
"""


def _train(ray_cluster, shards, storage, name, worker_env, **overrides):
    """A 2-worker training run driven from a subprocess; returns (summary, the driver's whole output)."""
    import subprocess
    import sys

    from tests.helpers import fast_train_overrides

    cfg = fast_train_overrides(shards, storage, name=name, **overrides)
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", _DRIVER, address, json.dumps(cfg), json.dumps(worker_env)],
                          capture_output=True, text=True, timeout=240, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):]), output


@pytest.mark.timeout(300)
def test_training_run_writes_one_offline_wandb_run_with_everything_and_no_key(ray_cluster, tiny_shards, tmp_path):
    """A 2-worker run, offline, with a (fake) API key in its workers' environment."""
    cap = 4
    summary, output = _train(ray_cluster, tiny_shards, tmp_path / "runs", "tracked", {"WANDB_API_KEY": FAKE_KEY},
                        **{"wandb.mode": "offline", "wandb.max_misclassified": cap, "optim.lr": 1e-5,
                           "train.tags": ["e2e"]})
    run_dir = Path(summary["run_dir"])
    run = _only_run(run_dir / "wandb")  # exactly one W&B run: rank 0 only
    assert output.count(f"W&B offline run saved in {run.path}; upload it with: wandb sync {run.path}") == 1
    assert run.run["id"] == tracking.run_id("distrain", str(run_dir))
    assert (run.run["job_type"], run.run["name"], run.run["tags"]) == ("train", "tracked", ["e2e"])
    assert run.config["optim.lr"] == 1e-5 and run.config["scaling.num_workers"] == 2
    assert run.exit_code == 0

    # Per-epoch metrics equal to what the run itself reports.
    epochs = [h for h in run.history if "val/top1" in h]
    assert [h["epoch"] for h in epochs] == [h["epoch"] for h in summary["history"]] == [1, 2]
    for logged, reported in zip(epochs, summary["history"], strict=True):
        for key in ("val_top1", "val_top5", "val_loss"):
            assert logged[f"val/{key[4:]}"] == pytest.approx(reported[key]), key
        assert logged["epoch/train_loss"] == pytest.approx(reported["train_loss"])
        assert set(k for k in logged if k.startswith("val/per_class_acc/")) == {
            f"val/per_class_acc/class_{c}" for c in range(3)}
    steps = [h for h in run.history if "train/step" in h]
    assert steps and all(h["train/step"] % 5 == 0 and h["train/loss"] > 0 for h in steps)
    assert run.summary["best_val_top1"] == pytest.approx(summary["best_val_top1"])
    assert run.summary["best_epoch"] == summary["best_epoch"]

    # The confusion matrix of the last epoch covers every validation image once.
    confusion = _table_rows(run, "val/confusion_matrix_table")
    assert len(confusion) == 2
    last = confusion[-1]
    assert len(last) == 9 and sum(r["nPredictions"] for r in last) == summary["history"][-1]["val_count"]
    correct = sum(r["nPredictions"] for r in last if r["Actual"] == r["Predicted"])
    assert correct / summary["history"][-1]["val_count"] == pytest.approx(summary["history"][-1]["val_top1"])

    # The misclassified table: the most confident mistakes, capped, each one a real mistake with its image.
    wrong = sum(r["nPredictions"] for r in last if r["Actual"] != r["Predicted"])
    assert wrong > 0  # lr 1e-5 keeps the head near its random start
    mis = _table_rows(run, "val/misclassified")[-1]
    assert len(mis) == min(cap, wrong)
    cells = {(r["Actual"], r["Predicted"]) for r in last if r["nPredictions"]}
    assert all(r["true"] != r["predicted"] and (r["true"], r["predicted"]) in cells for r in mis)
    assert [r["confidence"] for r in mis] == sorted((r["confidence"] for r in mis), reverse=True)
    images = _staged_images(run, "val/misclassified")
    assert [img.shape for img, _ in images] == [(32, 32, 3)] * len(mis)

    # The key was in the workers' environment; no file the run wrote holds it.
    home = Path(os.environ["HOME"])
    files = [p for p in [*run_dir.rglob("*"), *(home / ".cache" / "wandb").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / "summary.json").exists()
    leaks = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []



@pytest.mark.timeout(400)
def test_a_sweep_writes_one_trial_run_each_in_one_group(ray_cluster, tiny_shards, tmp_path):
    """A real Ray Tune sweep (2 one-worker trials, one at a time): one W&B run per trial, all in the sweep's group,
    and one sweep run holding the trial table."""
    from distrain.tune import run_sweep
    from tests.helpers import fast_train_overrides

    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path / "runs", name="unused", **{
        "tune.name": "sw3", "tune.num_samples": 1, "tune.scheduler": "fifo",
        "tune.space.optim.lr": "grid([0.003, 0.001])", "scaling.num_workers": 1,
        "tune.max_concurrent_trials": 1, "train.epochs": 1, "wandb.mode": "offline"}))
    sweep = run_sweep(cfg)
    sweep_dir = Path(sweep.summary["sweep_dir"])
    runs = [read_offline_run(p, wait_s=20) for p in sorted(sweep_dir.rglob("offline-run-*")) if p.is_dir()]
    trials = [r for r in runs if r.run["job_type"] == "trial"]
    assert len(trials) == 2
    assert {r.run["group"] for r in trials} == {"sw3"}
    assert sorted(r.run["name"] for r in trials) == sorted(row["trial"] for row in sweep.table)
    assert len({r.run["id"] for r in trials}) == 2
    assert sorted(r.config["optim.lr"] for r in trials) == [0.001, 0.003]
    by_name = {row["trial"]: row for row in sweep.table}
    for r in trials:
        (epoch,) = [h for h in r.history if "val/top1" in h]
        assert epoch["val/top1"] == pytest.approx(by_name[r.run["name"]]["best_val_top1"])

    (summary_run,) = [r for r in runs if r.run["job_type"] == "sweep"]
    assert (summary_run.run["group"], summary_run.run["name"]) == ("sw3", "sw3")
    (table,) = _table_rows(summary_run, "sweep/trials")
    assert sorted(row["trial"] for row in table) == sorted(by_name)
    assert summary_run.summary["num_trials"] == 2
    assert summary_run.summary["best/trial"] == sweep.summary["best_trial"]


def test_wandbs_environment_variables_decide_where_the_config_leaves_defaults(tmp_path, monkeypatch):
    """As for a plain wandb.init: WANDB_DIR, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS apply when the
    config leaves them empty; an explicit config value wins; the sync hint names wherever the run went."""
    from tests.wandb_offline import read_offline_run

    scratch = tmp_path / "scratch"
    env = {"WANDB_DIR": str(scratch), "WANDB_PROJECT": "envproj", "WANDB_RUN_GROUP": "envgroup",
           "WANDB_TAGS": "a,b", "WANDB_ENTITY": "envteam"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run_dir = str(tmp_path / "runs" / "envrun")
    t = _start(_cfg(tmp_path, **{"train.tags": []}), "envrun", run_dir=run_dir)  # tags left empty: WANDB_TAGS
    t.finish({"status": "ok"})
    (found,) = tracking.offline_runs(scratch / "wandb")
    assert not (tmp_path / "runs" / "envrun" / "wandb").exists()  # not under the run folder
    run = read_offline_run(found, wait_s=10).run
    assert (run["project"], run["group"], sorted(run["tags"])) == ("envproj", "envgroup", ["a", "b"])
    assert tracking.sync_hint(_cfg(tmp_path), run_dir) and str(scratch) in tracking.sync_hint(_cfg(tmp_path), run_dir)
    # explicit config values win over the environment
    cfg = _cfg(tmp_path, **{"wandb.project": "cfgproj", "wandb.dir": str(tmp_path / "cfgdir")})
    t = _start(cfg, "cfgrun", run_dir=str(tmp_path / "runs" / "cfgrun"), group="cfggroup")
    t.finish({"status": "ok"})
    (found,) = tracking.offline_runs(tmp_path / "cfgdir" / "wandb")
    run = read_offline_run(found, wait_s=10).run
    assert (run["project"], run["group"]) == ("cfgproj", "cfggroup")
