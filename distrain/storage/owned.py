"""What distrain made, and who is using it: the ownership marker (`.distrain.json`) that --restart and --overwrite
check before deleting anything, and the lock (`.distrain.lock`) that keeps one live run or sweep per folder.

Usage:
    from distrain import storage
    storage.mark(run_dir, "run", name="run")          # distrain made this folder
    storage.remove_owned(run_dir, "run")              # deletes only a folder distrain marked as a run folder
    with storage.RunLock(run_dir):                    # refuses while another live process holds the folder
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from distrain.storage import StorageError, fs_of, is_remote, join, read_json, url_of, write_bytes, write_json

MARKER = ".distrain.json"
LOCK = ".distrain.lock"



def mark(folder: str, kind: str, **info: Any) -> None:
    """Record that distrain created `folder` (a `run`, `sweep` or `shards` folder); kept if already there."""
    fs, path = fs_of(folder)
    marker = f"{path.rstrip('/')}/{MARKER}"
    if fs.exists(marker):
        return
    fs.makedirs(path, exist_ok=True)
    write_json(url_of(folder, marker), {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "host": socket.gethostname(), "pid": os.getpid(), **info})


def owner(folder: str) -> dict | None:
    """The marker of a folder distrain created, or None (no marker, or an unreadable one)."""
    try:
        data = read_json(join(folder, MARKER))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_empty(folder: str) -> bool:
    """True for a folder that does not exist or holds nothing."""
    fs, path = fs_of(folder)
    return not fs.exists(path) or not fs.ls(path, detail=False)


def remove_owned(folder: str, kind: str, what: str = "") -> bool:
    """Delete `folder` if distrain made it as a `kind` folder; returns whether something was deleted.

    A folder that does not exist is fine (nothing to do). A folder without distrain's marker, or with one of another
    kind, raises StorageError naming it, and nothing is touched."""
    fs, path = fs_of(folder)
    if not fs.exists(path):
        return False
    if not fs.isdir(path):
        raise StorageError(f"{folder} is a file, not a {kind} folder of distrain's: nothing was deleted")
    marker = owner(folder)
    if marker is None:
        raise StorageError(f"{folder} exists but distrain did not create it (no {MARKER} in it){what}: nothing was "
                           f"deleted. Move it away, or choose another name or storage path.")
    if marker.get("kind") != kind:
        raise StorageError(f"{folder} is a {marker.get('kind')} folder of distrain's, not a {kind} folder: nothing "
                           f"was deleted")
    fs.rm(path, recursive=True)
    return True


# --------------------------------------------------------------------------------------------------- locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> str | None:
    """The start time of a local process in clock ticks since boot (tells a reused pid from the original)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_HELD: set[str] = set()  # lock files the RunLocks of this process hold right now


class RunLock:
    """One live run or sweep per folder: `.distrain.lock` names the holder (host, pid, start time).

    A lock whose holder is gone is stale and taken over with a message: on this host, the holder's process no longer
    runs (or its pid was reused); on another host, its heartbeat (refreshed every `heartbeat_s`) is older than
    `stale_after_s`. On object stores two simultaneous starts can both win the race for a moment; the later
    heartbeat then shows the other holder (best effort: buckets have no exclusive create)."""

    def __init__(self, folder: str, what: str = "run", heartbeat_s: float = 30.0, stale_after_s: float = 180.0,
                 log=None):
        self.folder, self.what = folder, what
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.url = join(folder, LOCK)
        self.log = log or (lambda m: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}

    def holder(self) -> dict | None:
        try:
            data = read_json(self.url)
        except (FileNotFoundError, OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def stale(self, rec: dict) -> bool:
        if rec.get("host") == socket.gethostname():
            pid = int(rec.get("pid") or 0)
            if pid == os.getpid():  # ours: live if a lock object of this process holds it, else left behind
                return self.url not in _HELD
            return not _pid_alive(pid) or (rec.get("start") is not None and _process_start(pid) != rec.get("start"))
        return time.time() - float(rec.get("heartbeat") or 0) > self.stale_after_s

    def acquire(self) -> RunLock:
        fs, path = fs_of(self.url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        rec = self.holder()
        if rec is not None and not self.stale(rec):
            raise StorageError(f"{self.folder} is in use by another {self.what}: {rec.get('host')} pid "
                               f"{rec.get('pid')}, started {rec.get('started')}. Wait for it to end (or stop it), "
                               f"or use another name.")
        if rec is not None:
            self.log(f"taking over the lock of {self.folder}: its holder ({rec.get('host')} pid {rec.get('pid')}, "
                     f"started {rec.get('started')}) is gone")
        data = json.dumps(self.record).encode()
        if not is_remote(self.url):
            if rec is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            try:  # exclusive create: of two starts at the same moment, one wins
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                rec = self.holder() or {}
                raise StorageError(f"{self.folder} is in use by another {self.what}: {rec.get('host')} pid "
                                   f"{rec.get('pid')}, started {rec.get('started')}") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            write_bytes(self.url, data)
        _HELD.add(self.url)
        self._thread = threading.Thread(target=self._beat, name="distrain-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def rewrite(self) -> None:
        """Write the lock file again (after the folder holding it was emptied, e.g. by --restart)."""
        write_bytes(self.url, json.dumps(self.record).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.record["heartbeat"] = time.time()
            with contextlib.suppress(Exception):
                write_bytes(self.url, json.dumps(self.record).encode())

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.url)
        rec = self.holder()
        if rec is not None and rec.get("pid") == self.record["pid"] and rec.get("host") == self.record["host"]:
            try:
                fs, path = fs_of(self.url)
                fs.rm(path)
            except Exception as e:  # a storage gone read-only: the next start finds the holder gone and takes over
                self.log(f"could not remove the lock {self.url} ({type(e).__name__}: {e})")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


