"""Re-read every shard of a shards folder and check it against its manifest.

Usage:
    from distrain.shards.manifest import load_manifest
    from distrain.shards.verify import verify_shards
    report = verify_shards(load_manifest("data/pets"), decode=False)
    report.ok, report.problems          # False, ['train/train-000003.tar: sha256 ab12… != manifest cd34…']

Checks per shard: it exists, its size and sha256 match the manifest, it is a readable tar, its sample count
matches, every sample has one image, a `.cls` in the class range and a `.json`, and keys are unique in the
split. Per split: the total and the class counts match. With `decode`, every image is also decoded. A shard is
streamed once (hashing and parsing in the same pass), so memory stays flat for any shard size.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from distrain.images import IMAGE_KEYS
from distrain.shards.manifest import Manifest, resolve_url


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    class_counts: dict[str, list[int]] = field(default_factory=dict)   # per split, as read from the shards
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    """A read-only stream that hashes and counts everything read through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a tar stream, grouped the way webdataset groups them."""
    current_key, current = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            key = member.name[: len(member.name) - len(base)] + key
            data = tar.extractfile(member).read()
            if key != current_key and current_key is not None:
                yield current_key, current
                current = {}
            current_key = key
            current[ext.lower()] = data
    if current_key is not None:
        yield current_key, current


def _check_sample(where: str, key: str, sample: dict, num_classes: int,
                  decode: bool) -> tuple[int | None, list]:
    problems = []
    images = [e for e in sample if e in IMAGE_KEYS]
    if len(images) != 1:
        problems.append(f"{where}: sample {key} has {len(images)} images ({', '.join(sample)})")
    if "json" not in sample:
        problems.append(f"{where}: sample {key} has no .json")
    label = None
    try:
        label = int(sample.get("cls", b"").decode())
        if not 0 <= label < num_classes:
            problems.append(f"{where}: sample {key} has label {label}, outside 0..{num_classes - 1}")
            label = None
    except ValueError:
        problems.append(f"{where}: sample {key} has no valid .cls")
    if decode and len(images) == 1:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(sample[images[0]])) as img:
                img.load()
        except Exception as e:
            problems.append(f"{where}: sample {key} does not decode ({e})")
    return label, problems


def verify_shards(manifest: Manifest, decode: bool = False, progress: bool = False) -> VerifyReport:
    report = VerifyReport()
    t0 = time.perf_counter()
    total = sum(len(s.shards) for s in manifest.splits.values())
    from tqdm import tqdm

    with tqdm(total=total, unit="shard", desc="verifying", disable=not progress, mininterval=0.5) as bar:
        for split, info in manifest.splits.items():
            counts = [0] * manifest.num_classes
            keys: set[str] = set()
            for shard in info.shards:
                url, where = resolve_url(manifest.location, shard.url), shard.url
                report.shards += 1
                n = 0
                try:
                    with fsspec.open(url, "rb") as f:
                        stream = _HashingReader(f)
                        for key, sample in iter_samples(stream):
                            n += 1
                            if key in keys:
                                report.problems.append(f"{where}: key {key} repeats in split {split}")
                            keys.add(key)
                            label, problems = _check_sample(where, key, sample, manifest.num_classes, decode)
                            report.problems.extend(problems)
                            if label is not None:
                                counts[label] += 1
                        stream.drain()
                except FileNotFoundError:
                    report.problems.append(f"{where}: missing ({url})")
                    bar.update(1)
                    continue
                except (tarfile.TarError, OSError, EOFError) as e:
                    report.problems.append(f"{where}: not a readable tar ({e})")
                    bar.update(1)
                    continue
                report.samples += n
                report.bytes += stream.bytes
                if shard.bytes and stream.bytes != shard.bytes:
                    report.problems.append(f"{where}: {stream.bytes} bytes, manifest says {shard.bytes}")
                digest = stream.sha.hexdigest()
                if shard.sha256 and digest != shard.sha256:
                    report.problems.append(f"{where}: sha256 {digest[:12]}… does not match the manifest's "
                                           f"{shard.sha256[:12]}…")
                if n != shard.num_samples:
                    report.problems.append(f"{where}: {n} samples, manifest says {shard.num_samples}")
                bar.update(1)
            report.class_counts[split] = counts
            if sum(counts) != info.num_samples:
                report.problems.append(f"split {split}: {sum(counts)} valid samples in its shards, manifest "
                                       f"says {info.num_samples}")
            if info.class_counts and info.class_counts != counts:
                report.problems.append(f"split {split}: class counts {counts} do not match the manifest's "
                                       f"{info.class_counts}")
    report.seconds = time.perf_counter() - t0
    return report
