"""Write WebDataset tar shards to any fsspec URL: rolled by samples and bytes, temp names, sha256.

Usage:
    from distrain.shards.writer import ShardWriter, prepare_output
    output = prepare_output("s3://bucket/pets", overwrite=False)          # refuses a non-empty folder
    with ShardWriter(output.fs, f"{output.shard_root}/train", "train", max_samples=1000) as w:
        w.write("train_0000001", {"jpg": jpeg_bytes, "cls": b"3", "json": b"{...}"})
    w.shards      # [ShardInfo(url='train/train-000000.tar', num_samples=1000, bytes=..., sha256=...), ...]

A sample is the tar members `<key>.<ext>` in the order given; webdataset groups members by the key (the
basename up to its first dot), so keys carry no dots. Tar headers are fixed (mtime 0, uid/gid 0, no user
names, mode 0444), so the same samples give byte-identical shards. Each shard is written under a temporary
name and renamed when complete (local filesystems; on object stores the upload itself only appears once
complete); an interrupted writer deletes its partial shard. The shard's bytes and sha256 are counted as they
are written, never re-read.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
import time
import uuid
from dataclasses import dataclass

import fsspec

from distrain.shards.manifest import ShardInfo, resolve_url

BLOCK = 512
RECORD = 20 * BLOCK   # tar files are padded to a multiple of this
TAR_MTIME = 0


class OutputError(ValueError):
    """An output location that cannot be written as asked."""


def member_size(n: int) -> int:
    """Bytes a member of n data bytes takes in a tar: header + data padded to a block."""
    return BLOCK + -(-n // BLOCK) * BLOCK


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@dataclass
class Output:
    """Where a build writes: the output folder, and the subfolder (`build-<time>/`, or none) its shards go to.

    A first build writes `<out>/<split>/...`. Rebuilding over distrain's own shards (--overwrite) writes the new
    shards beside the old ones, in `<out>/build-<time>/<split>/...`, and `finish()` swaps at the end: the new
    manifest replaces the old one in one atomic write, and only then are the old shards (the files the old manifest
    listed, nothing else) deleted. A rebuild that fails or is interrupted leaves the old dataset as it was."""

    fs: object
    root: str
    out: str
    generation: str = ""                 # '' or 'build-YYYYmmddTHHMMSS'
    old: object = None                   # the Manifest being replaced

    @property
    def shard_root(self) -> str:
        return f"{self.root}/{self.generation}" if self.generation else self.root

    def url_base(self, split: str) -> str:
        return f"{self.generation}/{split}" if self.generation else split

    def discard(self) -> None:
        """A build that did not finish: remove its generation folder (only a fresh one of this build)."""
        if self.generation and self.fs.exists(self.shard_root):
            self.fs.rm(self.shard_root, recursive=True)

    def finish(self, new) -> list[str]:
        """After the new manifest is written: delete the old manifest's shards (none the new one names); returns
        them."""
        if self.old is None:
            return []
        keep = {resolve_url(self.root, sh.url) for info in new.splits.values() for sh in info.shards}
        gone = []
        for info in self.old.splits.values():
            for sh in info.shards:
                path = resolve_url(self.root, sh.url)
                if path not in keep and path.startswith(self.root.rstrip("/") + "/") and self.fs.exists(path):
                    self.fs.rm(path)
                    gone.append(path)
        for folder in sorted({g.rsplit("/", 1)[0] for g in gone}, key=len, reverse=True):
            while folder.startswith(self.root.rstrip("/") + "/"):
                if self.fs.exists(folder) and not self.fs.ls(folder, detail=False):
                    self.fs.rmdir(folder) if hasattr(self.fs, "rmdir") else self.fs.rm(folder, recursive=True)
                folder = folder.rsplit("/", 1)[0]
        return gone


def built_by_distrain(manifest) -> bool:
    """A manifest `distrain shards build` wrote (whose shards distrain made and may delete), not one of
    `distrain shards index` (whose shards are the user's own)."""
    return manifest is not None and not str(manifest.source).startswith("index:") and "seed" in manifest.options


def prepare_output(out: str, overwrite: bool) -> Output:
    """Check the output folder and say where this build writes (see Output). A folder that exists and is not empty
    is refused unless `overwrite`, and even then unless it holds distrain-built shards only: distrain deletes only
    what it can show it made."""
    from distrain.shards.manifest import ManifestError, load_manifest

    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/") or root
    output = Output(fs, root, out)
    if not fs.exists(root):
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
        return output
    if not fs.isdir(root):
        raise OutputError(f"output {out} exists and is a file")
    entries = fs.ls(root, detail=False)
    if not entries:
        return output
    if not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite to replace its "
                          f"shards, or choose another --out")
    try:
        old = load_manifest(out)
    except ManifestError:
        old = None
    if not built_by_distrain(old):
        what = "shards indexed in place (they are not distrain's to replace)" if old is not None else \
            "files but no manifest of distrain-built shards"
        raise OutputError(f"--overwrite: {out} holds {what}: nothing was deleted; choose another --out")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return Output(fs, root, out, generation=f"build-{stamp}-{uuid.uuid4().hex[:4]}", old=old)


class _HashingFile:
    """Counts and hashes what passes through to the underlying file."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)


@dataclass
class _Open:
    name: str                         # file name of the finished shard
    path: str                         # where it is being written (temp name on local filesystems)
    file: object = None
    out: _HashingFile | None = None
    samples: int = 0


class ShardWriter:
    """Writes samples into `folder/<prefix>-NNNNNN.tar`, starting a new shard when the next sample would pass
    `max_samples` or `max_bytes` (0 = no limit; a shard always holds at least one sample)."""

    def __init__(self, fs, folder: str, prefix: str, max_samples: int = 1000, max_bytes: int = 64_000_000,
                 url_base: str = ""):
        self.fs, self.folder, self.prefix = fs, folder.rstrip("/"), prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.url_base = url_base                # manifest URLs are relative: '<split>/<name>'
        self.shards: list[ShardInfo] = []
        self.local = is_local(fs)
        self._open: _Open | None = None
        if self.local:
            fs.makedirs(self.folder, exist_ok=True)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards) + (self._open.samples if self._open else 0)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits keys there)")
        size = sum(member_size(len(v)) for v in members.values())
        cur = self._open
        if cur is not None and cur.samples and (
                (self.max_samples and cur.samples >= self.max_samples)
                or (self.max_bytes and cur.out.bytes + size + 2 * BLOCK > self.max_bytes)):
            self._finish()
        if self._open is None:
            self._start()
        cur = self._open
        for ext, data in members.items():
            cur.out.write(tar_header(f"{key}.{ext}", len(data)))
            cur.out.write(data)
            pad = -len(data) % BLOCK
            if pad:
                cur.out.write(b"\0" * pad)
        cur.samples += 1

    def _start(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        final = f"{self.folder}/{name}"
        # Registered before the file exists: an interrupt at any point leaves abort() something to clean up.
        self._open = cur = _Open(name, f"{self.folder}/.{name}.tmp" if self.local else final)
        cur.file = self.fs.open(cur.path, "wb")
        cur.out = _HashingFile(cur.file)

    def _finish(self) -> None:
        cur = self._open
        end = 2 * BLOCK
        end += -(cur.out.bytes + end) % RECORD   # pad the archive to a whole tar record, as tar(1) does
        cur.out.write(b"\0" * end)
        cur.file.close()
        final = f"{self.folder}/{cur.name}"
        if cur.path != final:
            self.fs.mv(cur.path, final)
        # Only a renamed shard counts as written; until here an interrupt leaves it to abort().
        self._open = None
        self.shards.append(ShardInfo(url=posixpath.join(self.url_base, cur.name), num_samples=cur.samples,
                                     bytes=cur.out.bytes, sha256=cur.out.sha.hexdigest()))

    def abort(self) -> None:
        """Drop the shard being written (interrupted build)."""
        cur, self._open = self._open, None
        if cur is None:
            return
        if not self.local:
            # Closing would complete the upload of a partial shard: abort it (multipart) and never close.
            if cur.file is not None and not cur.file.closed:
                try:
                    cur.file.discard()
                finally:
                    cur.file.closed = True
            return
        try:
            if cur.file is not None:
                cur.file.close()
        finally:
            if self.fs.exists(cur.path):
                self.fs.rm(cur.path)

    def close(self) -> list[ShardInfo]:
        if self._open is not None and self._open.samples:
            self._finish()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
