"""Index WebDataset shards that other tools wrote, in place: `distrain shards index`.

Usage:
    distrain shards index --out data/pets --split train='s3://b/pets/train-{000000..000199}.tar' \
        --split val=s3://b/pets/val/ --label json:label
    distrain shards index --out data/laion --split train=/mnt/wds/ --val-shards 4 --label txt
    from distrain.data.index import IndexOptions, index_shards
    result = index_shards({"train": "shards/*.tar"}, "data/mine", IndexOptions(val_fraction=0.1))

The manifest refers to the original shard URLs (nothing is copied) and records per shard its sample count, bytes,
content hash (sha256 over every member's name and bytes, in order: tar headers with their timestamps do not
count), raw label counts, and its size + modification time or ETag (`stamp`). Running the index again reuses the
records of shards whose stamp did not change, so indexing a grown bucket reads only the new shards.

The sample count is what the loader will iterate (the same tar reader and key grouping as data/sources.py, which
follows WebDataset's: the key is the member path up to the first dot of its file name, extensions lower-cased), so
equal steps per rank and exact-once validation work on indexed shards as on distrain's own. The manifest's
`layout` tells the loader where the label and the image are: `cls` (default: the first of cls, label, target
present), `txt`, or `json:FIELD`; integers (class indices) or class names; the image is the first of jpg, jpeg,
png, webp unless `image_key` says otherwise. Samples without an image or a label, image headers that do not parse,
and keys seen twice in a shard are counted and listed in the manifest's `skipped` (the loader drops such samples
and counts them); a shard that cannot be read is listed and left out, unless `strict`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

from distrain import storage
from distrain.console import say, warn
from distrain.data.layout import LABEL_KEYS, image_of, label_of
from distrain.data.sources import DataError, expand_urls, iter_samples
from distrain.shards.manifest import Manifest, ManifestError, ShardInfo, SplitInfo, load_manifest, timm_info

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_LISTED = 200  # problem samples listed in the manifest (all are counted)


class IndexError_(ValueError):
    """Bad input to the indexer: the message names the source, field or value."""


@dataclass
class IndexOptions:
    label: str = ""                 # cls | label | target | txt | json:FIELD; "" = the first of LABEL_KEYS present
    classes: list[str] | None = None  # class names in label order; None = discovered
    image_key: str = ""             # "" = the first of IMAGE_KEYS present
    val_shards: int = 0             # one split only: cut this many whole shards off as val
    val_fraction: float = 0.0       # ... or this fraction of its shards (at least one)
    seed: int = 0
    workers: int = 0                # processes (0 = one per CPU)
    ray: bool = False               # scan with Ray tasks (a cluster of readers for thousands of remote shards)
    strict: bool = False            # an unreadable shard fails the index instead of being left out
    verify: bool = False            # decode every image
    read_timeout: float = 120.0
    progress: bool = True
    storage_options: dict | None = None


# ------------------------------------------------------------------------------------------------ sources


def list_source(source: str, storage_options: dict | None = None) -> list[str]:
    """A folder, a glob, a brace pattern or a text file of URLs → shard URLs (sorted within a folder or glob)."""
    import fsspec

    src = str(source).strip()
    if src.endswith((".txt", ".list")) and not any(c in src for c in "*?{"):
        text = storage.read_text(src)
        urls = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        base = src.rsplit("/", 1)[0] if "/" in src else "."
        return [u if "://" in u or u.startswith("/") else f"{base}/{u}" for u in urls]
    if "{" in src:
        return expand_urls(src)
    protocol = src.split("://", 1)[0] if "://" in src else "file"
    if protocol in ("http", "https"):
        return [src]  # HTTP has no listing: a single URL (use a brace pattern or a text file for several)
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    prefix = "" if protocol == "file" else f"{protocol}://"
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.endswith(SHARD_SUFFIXES))
    elif fs.exists(path):
        found = [path]
    else:
        found = []
    return [f"{prefix}{p}" if prefix and not p.startswith(prefix) else p for p in found
            if p.endswith(SHARD_SUFFIXES) or fnmatch.fnmatch(p, "*.tar*")]


def _stamp(url: str, storage_options: dict | None = None) -> tuple[int, str]:
    """(size in bytes, modification time or ETag) of a shard: what says whether it changed."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    info = fs.info(path)
    size = int(info.get("size") or 0)
    mark = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or \
        info.get("last_modified") or ""
    return size, str(mark).strip('"')


# ------------------------------------------------------------------------------------------------ one shard


def _header_ok(data: bytes, ext: str, verify: bool) -> bool:
    from distrain.data.decode import DecodeError, decode_full, jpeg_size

    if verify:
        try:
            decode_full(data)
            return True
        except DecodeError:
            return False
    if ext in ("jpg", "jpeg"):
        return jpeg_size(data) is not None
    if ext == "png":
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    if ext == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return len(data) > 0


def scan_shard(url: str, label: str = "", image_key: str = "", verify: bool = False,
               read_timeout: float | None = 120.0, storage_options: dict | None = None) -> dict:
    """Read one shard once: its record (or {'url', 'error'} when it cannot be read)."""
    t0 = time.perf_counter()
    try:
        size, stamp = _stamp(url, storage_options)
    except FileNotFoundError:
        return {"url": url, "error": "not found"}
    except Exception as e:  # whatever a remote filesystem raises: the shard is named with it
        return {"url": url, "error": f"{type(e).__name__}: {e}"}
    sha = hashlib.sha256()
    n, labels, problems, seen, used = 0, Counter(), [], set(), Counter()
    try:
        for sample in iter_samples(url, 0, None, storage_options, read_timeout):
            n += 1
            key = sample["__key__"]
            if key in seen:
                problems.append((key, "duplicate key"))
            seen.add(key)
            for ext in sorted(k for k in sample if not k.startswith("__")):
                sha.update(f"{key}.{ext}\0".encode())
                sha.update(sample[ext])
            found = label_of(sample, label)
            ext = image_of(sample, image_key)
            if ext is None:
                problems.append((key, "no image (" + ", ".join(k for k in sample if not k.startswith("__")) + ")"))
            elif not _header_ok(sample[ext], ext, verify):
                problems.append((key, f"{ext} does not decode" if verify else f"{ext} header does not parse"))
            if found is None:
                problems.append((key, "no label"))
            else:
                used[found[0]] += 1
                labels[json.dumps(found[1])] += 1  # JSON text: ints and names stay apart
    except DataError as e:
        return {"url": url, "error": str(e)}
    return {"url": url, "num_samples": n, "bytes": size, "sha256": sha.hexdigest(), "stamp": stamp,
            "labels": dict(labels), "label_keys": dict(used), "problems": problems,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ many shards


def _scan_all(urls: list[str], opts: IndexOptions) -> list[dict]:
    from tqdm import tqdm

    args = (opts.label, opts.image_key, opts.verify, opts.read_timeout, opts.storage_options)
    out: dict[str, dict] = {}
    bar = tqdm(total=len(urls), unit="shard", desc="indexing", disable=not opts.progress, mininterval=0.5)
    if opts.ray:
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(scan_shard)
        pending = {task.remote(u, *args): u for u in urls}
        while pending:
            # bounded waits: a reader that stalls ends by its own read timeout; this loop only reports progress
            done, _ = ray.wait(list(pending), num_returns=min(len(pending), 64), timeout=30)
            for ref in done:
                rec = ray.get(ref, timeout=60)
                out[pending.pop(ref)] = rec
                bar.update(1)
    elif (opts.workers or os.cpu_count() or 1) == 1 or len(urls) <= 2:
        for u in urls:
            out[u] = scan_shard(u, *args)
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        workers = min(len(urls), opts.workers or os.cpu_count() or 1)
        # fork: the readers start in milliseconds (spawn would import torch again in each); nothing here holds
        # threads or a Ray connection yet when the pool forks
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(scan_shard, u, *args): u for u in urls}
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                bar.update(1)
    bar.close()
    return [out[u] for u in urls]


def _relative(url: str, out: str) -> str:
    """A shard under the manifest's folder is stored relative to it (the pair can move together)."""
    base = storage.absolute(out).rstrip("/") + "/"
    full = url if "://" in url else storage.absolute(url)
    return full[len(base):] if full.startswith(base) else full


def _classes(records: list[dict], given: list[str] | None) -> tuple[list[str], bool]:
    """(classes, labels are names) from every shard's raw label counts; errors name the offending value."""
    values = {json.loads(v) for r in records for v in r.get("labels", {})}
    ints = {v for v in values if isinstance(v, int)}
    names = {v for v in values if isinstance(v, str)}
    if ints and names:
        raise IndexError_(f"labels mix integers ({sorted(ints)[:3]}) and class names ({sorted(names)[:3]}): "
                          f"use one kind, or --classes with names")
    if given is not None:
        if names:
            unknown = sorted(names - set(given))
            if unknown:
                raise IndexError_(f"label {unknown[0]!r} is not in --classes ({', '.join(given[:10])}"
                                  f"{' ...' if len(given) > 10 else ''})")
            return list(given), True
        bad = sorted(v for v in ints if not 0 <= v < len(given))
        if bad:
            raise IndexError_(f"label {bad[0]} is outside the {len(given)} classes of --classes")
        return list(given), False
    if names:
        return sorted(names), True
    if not ints:
        return [], False
    if min(ints) < 0:
        raise IndexError_(f"label {min(ints)} is negative: integer labels are class indices 0..K-1")
    k = max(ints) + 1
    if len(ints) < k:
        missing = sorted(set(range(k)) - ints)
        warn(f"integer labels have gaps: no sample of class {', '.join(map(str, missing[:10]))}"
             f"{' ...' if len(missing) > 10 else ''} (classes are 0..{k - 1})")
    return [str(i) for i in range(k)], False


def index_shards(splits: dict[str, str], out: str, opts: IndexOptions | None = None) -> dict:
    """Index `splits` (name → SOURCE) into out/manifest.json (+ _info.json); returns the figures."""
    opts = opts or IndexOptions()
    t0 = time.perf_counter()
    if len(splits) > 1 and (opts.val_shards or opts.val_fraction):
        raise IndexError_("--val-shards/--val-fraction cut one split in two: give a single --split")
    urls_of: dict[str, list[str]] = {}
    for name, source in splits.items():
        urls = list_source(source, opts.storage_options)
        if not urls:
            raise IndexError_(f"--split {name}={source}: matches no shard (.tar, .tar.gz, .tgz)")
        urls_of[name] = urls
    previous = _previous_records(out)
    fresh: list[str] = []
    records: dict[str, dict] = {}
    for urls in urls_of.values():
        for u in urls:
            old = previous.get(u)
            if old is not None:
                try:
                    size, stamp = _stamp(u, opts.storage_options)
                except Exception:
                    size, stamp = -1, ""
                if size == old.get("bytes") and stamp and stamp == old.get("stamp"):
                    records[u] = old
                    continue
            fresh.append(u)
    for rec in _scan_all(sorted(set(fresh)), opts):
        records[rec["url"]] = rec
    bad = [records[u] for urls in urls_of.values() for u in urls if "error" in records[u]]
    if bad and opts.strict:
        raise IndexError_("unreadable shards (--strict): " + "; ".join(f"{r['url']}: {r['error']}" for r in bad))
    for r in bad:
        warn(f"left out {r['url']}: {r['error']}")
    good = {u: r for u, r in records.items() if "error" not in r}
    if good and all(not r["labels"] for r in good.values()):
        what = opts.label or "any of " + ", ".join(LABEL_KEYS)
        raise IndexError_(f"no sample has a label ({what}); choose one with --label (cls, txt or json:FIELD)")
    classes, names = _classes(list(good.values()), opts.classes)
    index_of = {c: i for i, c in enumerate(classes)}

    def info(u: str) -> ShardInfo:
        r = good[u]
        return ShardInfo(_relative(u, out), r["num_samples"], r["bytes"], r["sha256"], stamp=r["stamp"],
                         labels=r["labels"])

    split_urls = {n: [u for u in urls if u in good] for n, urls in urls_of.items()}
    if len(split_urls) == 1 and (opts.val_shards or opts.val_fraction):
        split_urls = _cut_val(split_urls, opts)
    manifest_splits: dict[str, SplitInfo] = {}
    for n, urls in split_urls.items():
        counts = [0] * len(classes)
        for u in urls:
            for raw, c in good[u]["labels"].items():
                value = json.loads(raw)
                counts[index_of[value] if names else int(value)] += c
        shards = [info(u) for u in urls]
        manifest_splits[n] = SplitInfo(sum(s.num_samples for s in shards), shards, counts)
    skipped = [{"path": f"{u}#{k}", "reason": why} for u, r in good.items() for k, why in r["problems"]]
    keys_used = Counter()
    for r in good.values():
        keys_used.update(r["label_keys"])
    layout = {"label": opts.label or (keys_used.most_common(1)[0][0] if keys_used else "cls"),
              "label_names": names, "image_key": opts.image_key}
    manifest = Manifest(classes=classes, splits=manifest_splits, skipped=skipped[:MAX_LISTED],
                        source="index:" + ";".join(f"{n}={s}" for n, s in splits.items()),
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        options={**{k: v for k, v in asdict(opts).items() if k not in ("storage_options",)},
                                 "problems": len(skipped), "unreadable": [f"{r['url']}: {r['error']}" for r in bad]},
                        layout=layout)
    storage.write_text(storage.join(out, "manifest.json"), manifest.to_json())
    storage.write_json(storage.join(out, "_info.json"), timm_info(manifest, os.path.basename(out.rstrip("/"))))
    seconds = time.perf_counter() - t0
    read = [good[u] for u in fresh if u in good]
    read_bytes = sum(r["bytes"] for r in read)
    figures = {"out": out, "classes": len(classes), "label": layout["label"], "label_names": names,
               "samples": {n: s.num_samples for n, s in manifest_splits.items()},
               "shards": {n: len(s.shards) for n, s in manifest_splits.items()},
               "read": len(fresh), "reused": len(records) - len(fresh), "unreadable": len(bad),
               "problems": len(skipped), "seconds": round(seconds, 2),
               "shards_per_s": round(len(fresh) / max(seconds, 1e-9), 1),
               "mb_per_s": round(read_bytes / 1e6 / max(seconds, 1e-9), 1)}
    say(f"indexed {sum(figures['shards'].values())} shards ({figures['read']} read, {figures['reused']} unchanged)"
        f": {', '.join(f'{n} {c}' for n, c in figures['samples'].items())} samples, {len(classes)} classes"
        + (f"; {len(skipped)} problem samples listed in the manifest" if skipped else ""))
    return figures


def _previous_records(out: str) -> dict[str, dict]:
    """Per-shard records of an earlier index in `out` (absolute URL → record), for reuse."""
    try:
        m = load_manifest(out)
    except (ManifestError, FileNotFoundError, OSError):
        return {}
    if not m.source.startswith("index:"):
        return {}
    recs = {}
    for name in m.splits:
        for s, u in zip(m.split(name).shards, m.shard_urls(name)):
            recs[u] = {"url": u, "num_samples": s.num_samples, "bytes": s.bytes, "sha256": s.sha256,
                       "stamp": s.stamp, "labels": dict(s.labels), "label_keys": {}, "problems": []}
    for item in m.skipped:  # problems of reused shards stay listed
        u, _, k = str(item.get("path", "")).rpartition("#")
        if u in recs:
            recs[u]["problems"].append((k, item.get("reason", "")))
    return recs


def _cut_val(split_urls: dict[str, list[str]], opts: IndexOptions) -> dict[str, list[str]]:
    import random

    (name, urls), = split_urls.items()
    k = opts.val_shards or max(1, round(opts.val_fraction * len(urls)))
    if k >= len(urls):
        raise IndexError_(f"--split {name}: {len(urls)} readable shard(s) cannot give {k} to val and keep one "
                          f"for training")
    order = list(urls)
    random.Random(opts.seed).shuffle(order)
    val = set(order[:k])
    return {"train" if name == "val" else name: [u for u in urls if u not in val],
            "val" if name != "val" else "train": [u for u in urls if u in val]}



def verify_index(manifest: Manifest, decode: bool = False, progress: bool = False, workers: int = 0):
    """`shards inspect --verify` of an indexed manifest: every shard read again, its sample count and content
    hash compared with the manifest's (a shards.verify.VerifyReport)."""
    from distrain.shards.verify import VerifyReport

    report = VerifyReport()
    t0 = time.perf_counter()
    urls = {u: s for name in manifest.splits for s, u in zip(manifest.split(name).shards, manifest.shard_urls(name))}
    layout = manifest.layout or {}
    opts = IndexOptions(label=layout.get("label", ""), image_key=layout.get("image_key", ""), verify=decode,
                        workers=workers, progress=progress)
    for rec in _scan_all(list(urls), opts):
        shard = urls[rec["url"]]
        report.shards += 1
        if "error" in rec:
            report.problems.append(f"{shard.url}: {rec['error']}")
            continue
        report.samples += rec["num_samples"]
        report.bytes += rec["bytes"]
        if rec["num_samples"] != shard.num_samples:
            report.problems.append(f"{shard.url}: {rec['num_samples']} samples, the manifest says "
                                   f"{shard.num_samples}")
        if shard.bytes and rec["bytes"] != shard.bytes:
            report.problems.append(f"{shard.url}: {rec['bytes']} bytes, the manifest says {shard.bytes}")
        if shard.sha256 and rec["sha256"] != shard.sha256:
            report.problems.append(f"{shard.url}: content changed since it was indexed (sha256 "
                                   f"{rec['sha256'][:12]}… != {shard.sha256[:12]}…): index it again")
        report.problems.extend(f"{shard.url}#{k}: {why}" for k, why in rec["problems"] if decode)
    report.seconds = time.perf_counter() - t0
    return report
