"""Nothing lost: --restart deletes only what distrain made, and only after every check passed; one live run per
folder; results written atomically. Real folders, real processes (a lock holder killed with SIGKILL), the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrain import storage
from distrain.cli import main
from tests.helpers import ROOT, fast_train_overrides


def _user_folder(path: Path) -> Path:
    """A folder of a user's own files (nothing distrain made)."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "notes" / "todo.txt").write_text("back up")
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def test_restart_with_a_bad_name_or_bad_shards_touches_nothing(tiny_shards, tmp_path, capsys):
    """The report that opened issue 13: an empty name, `..`, a typo'd shards path, each with --restart over a
    folder of the user's files."""
    home = _user_folder(tmp_path / "some" / "dir")
    before = _files(tmp_path)
    for name in ("", "..", "../dir"):
        code = main(["train", "--set", f"train.name={name}", "--set", f"scaling.storage_path={home}",
                     "--set", f"data.shards={tiny_shards}", "--restart"])
        assert code == 2 and "'train.name'" in capsys.readouterr().err
    code = main(["train", "--set", "train.name=run", "--set", f"scaling.storage_path={home}",
                 "--set", "data.shards=/typo", "--restart"])
    assert code == 2 and "no shards manifest at /typo" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_restart_refuses_a_folder_distrain_did_not_make(tiny_shards, tmp_path, capsys):
    home = tmp_path / "storage"
    mine = _user_folder(home / "run")  # the user's folder happens to have the run's name
    before = _files(mine)
    code = main(["train", *_sets(fast_train_overrides(tiny_shards, home, name="run")), "--restart"])
    err = capsys.readouterr().err
    assert code == 2 and f"{mine} exists but distrain did not create it" in err and "nothing was deleted" in err
    assert _files(mine) == before
    # without --restart it is not written into either
    code = main(["train", *_sets(fast_train_overrides(tiny_shards, home, name="run"))])
    assert code == 2 and "holds files distrain did not write" in capsys.readouterr().err
    assert _files(mine) == before
    # a sweep the same
    sweep = _user_folder(home / "sw")
    sweep_before = _files(sweep)
    code = main(["tune", *_sets(fast_train_overrides(tiny_shards, home, name="run")), "--set", "tune.name=sw",
                 "--set", "tune.space.optim.lr=loguniform(1e-4, 1e-2)", "--set", "tune.scheduler=fifo",
                 "--restart"])
    assert code == 2 and f"{sweep} exists and distrain did not create it" in capsys.readouterr().err
    assert _files(sweep) == sweep_before


def test_remove_owned_deletes_only_marked_folders_of_its_kind(tmp_path):
    with pytest.raises(storage.StorageError, match="distrain did not create it"):
        storage.remove_owned(str(_user_folder(tmp_path / "a")), "run")
    storage.mark(str(tmp_path / "s"), "sweep", name="s")
    with pytest.raises(storage.StorageError, match="is a sweep folder of distrain's, not a run folder"):
        storage.remove_owned(str(tmp_path / "s"), "run")
    storage.mark(str(tmp_path / "r"), "run", name="r")
    (tmp_path / "r" / "checkpoint_epoch_0001").mkdir()
    assert storage.remove_owned(str(tmp_path / "r"), "run") and not (tmp_path / "r").exists()
    assert storage.remove_owned(str(tmp_path / "never"), "run") is False


HOLD_LOCK = """
import sys, time
from distrain import storage
lock = storage.RunLock(sys.argv[1], "training run").acquire()
print("LOCKED", flush=True)
time.sleep(600)
"""


def test_one_live_run_per_folder_and_a_killed_holders_lock_is_taken_over(tiny_shards, tmp_path, capsys):
    storage_path = tmp_path / "runs"
    run_dir = storage_path / "busy"
    storage.mark(str(run_dir), "run", name="busy")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        record = json.loads((run_dir / ".distrain.lock").read_text())
        code = main(["train", *_sets(fast_train_overrides(tiny_shards, storage_path, name="busy"))])
        err = capsys.readouterr().err
        assert code == 2 and f"{run_dir} is in use by another training run" in err
        assert f"pid {holder.pid}" in err and record["host"] in err and record["started"] in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    # The holder died without releasing: the next start sees a stale lock and takes it over, saying so.
    messages = []
    lock = storage.RunLock(str(run_dir), "training run", log=messages.append).acquire()
    try:
        assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "is gone" in messages[0]
        assert json.loads((run_dir / ".distrain.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run_dir / ".distrain.lock").exists()


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "summary.json"
    storage.write_json(str(target), {"v": 1})
    # a writer killed mid-write: simulate with a child that dies inside write_bytes before the rename
    code = ("import os, sys\n"
            "from distrain import storage\n"
            "real = os.replace\n"
            "os.replace = lambda *a: os._exit(9)\n"
            "storage.write_json(sys.argv[1], {'v': 2, 'pad': 'x' * 100000})\n")
    out = subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 9
    assert json.loads(target.read_text()) == {"v": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] != [] and (tmp_path / "summary.json").exists()
    with storage.atomic_dir(str(tmp_path / "model")) as d:
        Path(d, "config.json").write_text("{}")
    with pytest.raises(RuntimeError), storage.atomic_dir(str(tmp_path / "model")) as d:
        Path(d, "config.json").write_text("half")
        raise RuntimeError("the write failed")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # the failed rewrite changed nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == []


def test_secrets_are_redacted_in_every_file_a_run_writes(tmp_path):
    from distrain.config import load_config, save_config
    from distrain.redact import redact

    secret_url = "s3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@bucket/shards"
    cfg = load_config(None, {"data.shards": secret_url,
                             "model.weights": "https://h/w.pth?X-Amz-Signature=abcdef0123&X-Amz-Credential=k1"})
    save_config(cfg, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "wJalr" not in text and "abcdef0123" not in text and "s3://<redacted>@bucket/shards" in text
    assert redact({"a": [secret_url]}) == {"a": ["s3://<redacted>@bucket/shards"]}
    start = time.time()
    os.environ["DISTRAIN_TEST_TOKEN"] = "tok-0123456789abcdef"
    try:
        storage.write_text(str(tmp_path / "log.txt"), "the token is tok-0123456789abcdef")
        assert (tmp_path / "log.txt").read_text() == "the token is <redacted>"
    finally:
        del os.environ["DISTRAIN_TEST_TOKEN"]
    assert time.time() - start < 5
