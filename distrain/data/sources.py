"""Where samples come from: shard URLs (local, file://, s3://, gs://, http(s)://, brace patterns) read as streams.

Usage:
    from distrain.data.sources import resolve_source, iter_samples
    shards = resolve_source("data/fashion-mnist", "train")          # a manifest folder/URL, a Manifest, or URLs
    shards.urls, shards.sizes, shards.classes
    resolve_source("s3://bucket/train-{000000..000099}.tar", "train", num_samples=1_000_000)
    for sample in iter_samples(shards.urls[0], start=10, stop=20):  # {'__key__', '__url__', 'jpg', 'cls', ...}
        ...

Reading streams: a shard is opened with fsspec (plain `open` for local files) and walked front to back by
tar.TarStream, so remote shards are never copied to local disk and an HTTP server without range support works.
Samples are the tar's consecutive files sharing a key (the name up to the first dot of the basename, the folder
prefix included), the WebDataset convention. Credentials and endpoints for object stores come from the usual
places (AWS_* variables, ~/.aws, fsspec config such as FSSPEC_S3_ENDPOINT_URL) or `storage_options`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from distrain.data.tar import TarError, TarStream
from distrain.shards.manifest import Manifest, load_manifest

# Remote reads come in blocks of this size (a read-ahead cache, not a download of the shard).
REMOTE_BLOCK = 8 << 20


class DataError(ValueError):
    """Unusable input data (a missing shard, a sample without a label): the message names the URL and key."""


@dataclass
class ShardSet:
    """The shards of one split and what is known about them."""

    urls: list[str]
    sizes: list[int] | None           # samples per shard; None when neither a manifest nor counting gave them
    num_samples: int | None
    classes: list[str] | None = None  # from the manifest; None for raw URL lists
    location: str = ""                # manifest folder, or the URL pattern
    layout: dict | None = None        # the manifest's layout (data/layout.py); None = distrain's own (.cls, image)


def expand_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Brace patterns ('train-{000000..000099}.tar') and lists of them to a flat URL list."""
    import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for s in specs:
        for part in str(s).split("::"):  # webdataset's separator for several patterns in one string
            urls.extend(braceexpand.braceexpand(part.strip()))
    return urls


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _looks_like_shards(spec: Any) -> bool:
    if isinstance(spec, (list, tuple)):
        return True
    s = str(spec)
    return s.endswith(".tar") or (".tar" in s and "{" in s) or "::" in s


class StalledRead(DataError):
    """A shard read that returned nothing within the read timeout (a hung NFS mount, a FIFO, a silent server)."""


class TimedReader:
    """A shard's bytes read by a helper thread in 1 MiB chunks, so that every read has a bound: `read()` raises
    StalledRead (naming the URL and byte offset) when no data came within `timeout` seconds. A read blocked in the
    kernel (NFS, a FIFO) cannot be interrupted from Python; the helper thread is left to it and the shard counts as
    unreadable, instead of the whole job waiting on it."""

    CHUNK = 1 << 20

    def __init__(self, opener: Callable[[], BinaryIO], url: str, timeout: float):
        self.url, self.timeout, self.offset = url, timeout, 0
        self._chunks: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._buf, self._pos, self._eof = b"", 0, False
        self._thread = threading.Thread(target=self._pump, args=(opener,), daemon=True, name="distrain-read")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, opener) -> None:
        try:
            with opener() as f:
                while not self._stop.is_set():
                    data = f.read(self.CHUNK)
                    if not self._put(data) or not data:
                        return
        except BaseException as e:  # handed to the reading thread, which raises it there
            self._put(e)

    def read(self, n: int = -1) -> bytes:
        out = []
        need = n if n >= 0 else 1 << 62
        while need > 0:
            if self._pos < len(self._buf):
                piece = self._buf[self._pos:self._pos + need]
                self._pos += len(piece)
                need -= len(piece)
                out.append(piece)
                continue
            if self._eof:
                break
            try:
                item = self._chunks.get(timeout=self.timeout)
            except queue.Empty:
                raise StalledRead(f"{self.url}: no data for {self.timeout:g} s at byte {self.offset} (a stuck "
                                  f"read: hung storage, a FIFO, or a server that stopped sending)") from None
            if isinstance(item, BaseException):
                if isinstance(item, FileNotFoundError):
                    raise DataError(f"shard not found: {self.url}") from None
                raise item
            if not item:
                self._eof = True
            self._buf, self._pos = item, 0
        data = b"".join(out)
        self.offset += len(data)
        return data

    def close(self) -> None:
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, storage_options: dict | None = None, timeout: float | None = None) -> BinaryIO:
    """A sequential byte stream of one shard; DataError names the URL when it does not exist. With `timeout`, every
    read is bounded (TimedReader) and what is not a regular file (a FIFO, a device) is refused before it is opened."""
    path = _local_path(url)
    if path is not None:
        if timeout is not None:
            import stat

            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                raise DataError(f"shard not found: {url}") from None
            if not stat.S_ISREG(mode):
                raise DataError(f"{url}: not a regular file (a FIFO, socket or device): not read")
            return TimedReader(lambda: open(path, "rb", buffering=0), url, timeout)
        try:
            return open(path, "rb", buffering=1 << 20)
        except FileNotFoundError:
            raise DataError(f"shard not found: {url}") from None
    if timeout is not None:
        return TimedReader(lambda: _open_remote(url, storage_options), url, timeout)
    return _open_remote(url, storage_options)


def _open_remote(url: str, storage_options: dict | None = None) -> BinaryIO:
    import fsspec

    if url.startswith(("http://", "https://")):
        options = {"block_size": 0}  # a plain streaming GET: works without Range support
    else:
        options = {"block_size": REMOTE_BLOCK, "cache_type": "readahead"}
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return fs.open(path, "rb", **options)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None


def split_name(name: str) -> tuple[str, str]:
    """'train/abc.cls' -> ('train/abc', 'cls'); the extension is lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


def _members(url: str, stream: BinaryIO) -> TarStream:
    if url.endswith((".gz", ".tgz")):
        import gzip

        stream = gzip.GzipFile(fileobj=stream)
    return TarStream(stream, url)


def _sample_entries(tar: TarStream) -> Iterator[tuple[str, str]]:
    """(key, ext) of the tar's sample files; folders, extension-less and '__meta__'-style entries are not."""
    for name, _ in tar:
        key, ext = split_name(name)
        if ext and not key.rpartition("/")[2].startswith("_"):
            yield key, ext


def iter_samples(url: str, start: int = 0, stop: int | None = None, storage_options: dict | None = None,
                 timeout: float | None = None) -> Iterator[dict]:
    """Samples [start, stop) of one shard as dicts {'__key__', '__url__', '__index__', ext: bytes, ...}.

    Samples before `start` are skipped without reading their data (seeked over on local files). A shard that
    ends before `stop` raises DataError (its manifest count is wrong): silently yielding fewer would break the plan.
    With `timeout`, every read is bounded (StalledRead).
    """
    stream = open_shard(url, storage_options, timeout)
    index, current = -1, None
    try:
        tar = _members(url, stream)
        for key, ext in _sample_entries(tar):
            if current is None or key != current["__key__"]:
                if current is not None and index >= start:
                    yield current
                index += 1
                if stop is not None and index >= stop:
                    current = None
                    break
                current = {"__key__": key, "__url__": url, "__index__": index}
            if index >= start:
                current[ext] = tar.read()
    except (TarError, OSError, EOFError) as e:  # gzip raises OSError/EOFError on damaged data
        raise DataError(f"{url}: unreadable shard after sample {index}: {e}") from None
    except DataError:
        raise
    except Exception as e:  # whatever a remote filesystem raises (aiohttp, botocore): one line, the URL named
        raise DataError(f"{url}: unreadable shard after sample {index}: {type(e).__name__}: {e}") from None
    finally:
        stream.close()
    if current is not None and index >= start:
        yield current
    if stop is not None and index + 1 < stop:
        raise DataError(f"{url}: holds {index + 1} samples but {stop} were expected (the manifest "
                        f"disagrees with the shard; rebuild it)")


def count_samples(url: str, storage_options: dict | None = None) -> int:
    """Samples in one shard (reads only headers of local files; streams remote ones)."""
    n, last = 0, None
    stream = open_shard(url, storage_options)
    try:
        for key, _ in _sample_entries(_members(url, stream)):
            if key != last:
                n, last = n + 1, key
    except (TarError, OSError, EOFError) as e:
        raise DataError(f"{url}: unreadable shard: {e}") from None
    finally:
        stream.close()
    return n


def check_urls(urls: list[str], storage_options: dict | None = None) -> None:
    """Raise DataError naming the shard URLs that do not exist (one listing per folder, not one call per shard)."""
    missing: list[str] = []
    remote: dict[str, list[str]] = {}
    for url in urls:
        path = _local_path(url)
        if path is not None:
            if not os.path.isfile(path):
                missing.append(url)
        else:
            remote.setdefault(url.split("://", 1)[0], []).append(url)
    if remote:
        import fsspec

        for protocol, group in remote.items():
            fs = fsspec.filesystem(protocol, **(storage_options or {}))
            if protocol in ("http", "https"):
                missing.extend(u for u in group if not fs.exists(u))
                continue
            by_folder: dict[str, list[str]] = {}
            for u in group:
                by_folder.setdefault(u.rsplit("/", 1)[0], []).append(u)
            for folder, members in by_folder.items():
                try:
                    fs.invalidate_cache(folder)
                    listed = {fs._strip_protocol(p) for p in fs.ls(folder, detail=False)}
                except (FileNotFoundError, OSError):
                    listed = set()
                missing.extend(u for u in members if fs._strip_protocol(u) not in listed and not fs.exists(u))
    if missing:
        more = f" (and {len(missing) - 1} more shard(s) missing)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}")


def resolve_source(source: Any, split: str = "train", num_samples: int | None = None,
                   storage_options: dict | None = None, check: bool = True) -> ShardSet:
    """A manifest (folder, manifest.json path/URL, or Manifest) or shard URLs to the split's ShardSet.

    Raw URL lists have no per-shard counts: with `num_samples` given they are trusted as the total (training then
    resamples); otherwise every shard is counted once here.
    """
    if isinstance(source, Manifest):
        manifest = source
    elif _looks_like_shards(source):
        urls = expand_urls(source)
        if not urls:
            raise DataError(f"no shard URLs in {source!r}")
        if check:
            check_urls(urls, storage_options)
        sizes = None
        if num_samples is None:
            sizes = [count_samples(u, storage_options) for u in urls]
            num_samples = sum(sizes)
        return ShardSet(urls, sizes, num_samples, None, str(source))
    else:
        manifest = load_manifest(str(source))
    urls = manifest.shard_urls(split)
    if check:
        check_urls(urls, storage_options)
    sizes = manifest.shard_sizes(split)
    return ShardSet(urls, sizes, sum(sizes), list(manifest.classes), manifest.location, manifest.layout or None)
