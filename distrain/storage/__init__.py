"""Storage: local folders, shared mounts and object stores behind one set of functions that never lose data.

Usage:
    from distrain import storage
    fs, path = storage.fs_of("s3://bucket/runs/x")        # fsspec filesystem and path
    storage.is_remote("gs://b/x"), storage.absolute("outputs")
    storage.write_json("s3://bucket/runs/x/summary.json", summary)     # atomic, secrets redacted
    with storage.atomic_dir("outputs/run/model") as tmp:               # a folder replaced whole, or not at all
        ...write files into tmp...
    storage.mark(run_dir, "run", name="run")                           # distrain made this folder
    storage.remove_owned(run_dir, "run")                               # deletes only a folder distrain marked
    with storage.RunLock(run_dir):                                     # one live run per folder
        ...

Why one module: every file a run leaves must be written atomically (temporary name, then rename), may live on a
local disk, NFS or a bucket, and must pass through the same redaction; and nothing may be deleted unless distrain can
prove it made it. Deletion is therefore tied to a marker file (`.distrain.json`) that distrain writes when it creates
a run, sweep or shards folder: `remove_owned` refuses any folder without one, naming it and touching nothing.
On object stores "atomic" means: written under a temporary key, then copied/renamed to the final key (a reader never
sees half a file); a folder is replaced object by object with its index file (config.json) written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    """A storage operation refused or failed; the message names the path and what to do."""


# --------------------------------------------------------------------------------------------------- paths


def is_remote(path: str) -> bool:
    """An object-store or HTTP URL (s3://, gs://, https://, ...); local paths and file:// are not."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    return str(path).removeprefix("file://")


def absolute(path: str) -> str:
    """Local paths made absolute (workers and trial drivers run in other working directories); URLs as they are."""
    path = local_path(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *names: str) -> str:
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


def absolute_paths(cfg):
    """The config with its local paths made absolute (Train workers and Tune trial drivers run in other working
    directories): storage, shards, a weights file, the W&B folder. URLs stay as they are."""
    updates: dict[str, Any] = {"scaling.storage_path": absolute(cfg.scaling.storage_path)}
    if not is_remote(cfg.data.shards):
        updates["data.shards"] = absolute(cfg.data.shards)
    weights = cfg.model.weights
    if not is_remote(weights) and os.path.exists(os.path.expanduser(weights)):
        updates["model.weights"] = absolute(weights)
    if cfg.wandb.dir and not is_remote(cfg.wandb.dir):
        updates["wandb.dir"] = absolute(cfg.wandb.dir)
    return cfg.replace(updates)


def run_folder(cfg) -> str:
    """A training run's folder: scaling.storage_path/train.name (the one place that says so)."""
    return join(absolute(cfg.scaling.storage_path), cfg.train.name)


def sweep_folder(cfg) -> str:
    """A sweep's folder: scaling.storage_path/tune.name."""
    return join(absolute(cfg.scaling.storage_path), cfg.tune.name)


def fs_of(url: str, **options):
    """(fsspec filesystem, path) of a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(local_path(url) if not is_remote(url) else url, **options)


def url_of(base_url: str, fs_path: str) -> str:
    """An fsspec path of the filesystem of `base_url` as a URL (s3://bucket/key); local paths stay paths."""
    if not is_remote(base_url) or "://" in fs_path:
        return fs_path
    return f"{base_url.split('://', 1)[0]}://{fs_path}"


def exists(url: str) -> bool:
    fs, path = fs_of(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    fs, path = fs_of(url)
    return fs.cat_file(path).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))  # ValueError on a damaged file, FileNotFoundError on none


# --------------------------------------------------------------------------------------------------- writing


def write_bytes(url: str, data: bytes) -> str:
    """Write `data` to `url` atomically: a temporary name in the same folder, fsync, rename (local); a temporary
    key, then a server-side rename (object stores). A reader sees the old file or the new one, never half of one."""
    fs, path = fs_of(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    name = path.rsplit("/", 1)[-1]
    if not is_remote(url):
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(parent)
        return url
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
    return url


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(url: str, text: str, redact: bool = True) -> str:
    """Atomic text file; credentials redacted (distrain/redact.py) unless `redact=False`."""
    if redact:
        from distrain.redact import redact_text

        text = redact_text(text)
    return write_bytes(url, text.encode("utf-8"))


def write_section(url: str, name: str, section: str) -> str:
    """Replace the `<!-- name:start -->`...`<!-- name:end -->` block of a text file (or append it; or write the
    file), atomically: what else the file says is kept."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = read_text(url) if exists(url) else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    return write_text(url, text, redact=False)


def write_json(url: str, value: Any, redact: bool = True, indent: int | None = 2) -> str:
    """Atomic JSON file; credentials redacted in every string of `value`."""
    if redact:
        from distrain.redact import redact as scrub

        value = scrub(value)
    return write_bytes(url, json.dumps(value, indent=indent, default=str).encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(url: str) -> Iterator[str]:
    """Yields a local temporary folder; when the block ends without an error its files replace the folder `url`.

    Local: the new folder is built next to the old one and swapped in by two renames, so `url` always holds a
    complete folder (old or new). Object stores: files are uploaded one by one, those named `config.json` last (the
    file a reader opens first), then objects of the old folder that the new one lacks are deleted. On an error
    nothing at `url` changes."""
    import shutil
    import tempfile

    if not is_remote(url):
        final = Path(local_path(url)).absolute()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield str(tmp)
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(str(final.parent))
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    fs, root = fs_of(url)
    with tempfile.TemporaryDirectory(prefix="distrain-dir-") as tmp:
        yield tmp
        files = sorted((p for p in Path(tmp).rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", p))
        names = set()
        for p in files:
            rel = p.relative_to(tmp).as_posix()
            names.add(rel)
            write_bytes(url_of(url, f"{root.rstrip('/')}/{rel}"), p.read_bytes())
        if fs.exists(root):
            for old in fs.find(root):
                if old[len(root.rstrip("/")) + 1:] not in names:
                    fs.rm(old)



def check_writable(folder: str) -> None:
    """Raise StorageError if `folder` cannot be created and written (a probe file, removed again)."""
    try:
        fs, path = fs_of(folder)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.distrain-write-probe-{uuid.uuid4().hex[:6]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:
        raise StorageError(f"cannot write to {folder} ({type(e).__name__}: {e})") from None


from distrain.storage.mounts import (  # noqa: E402  (the rest of the one storage owner)
    SHARED_FS_TYPES,
    SHARED_STORAGE_ENV,
    declared_shared,
    mount_of,
    node_local_message,
    shared,
)
from distrain.storage.owned import LOCK, MARKER, RunLock, is_empty, mark, owner, remove_owned  # noqa: E402

__all__ = ["LOCK", "MARKER", "SHARED_FS_TYPES", "SHARED_STORAGE_ENV", "RunLock", "StorageError", "absolute",
           "absolute_paths", "atomic_dir", "check_writable", "declared_shared", "exists", "fs_of", "is_empty",
           "is_remote", "join", "local_path", "mark", "mount_of", "node_local_message", "owner", "read_json",
           "read_text", "remove_owned", "run_folder", "shared", "sweep_folder", "url_of", "write_bytes",
           "write_json", "write_text"]
