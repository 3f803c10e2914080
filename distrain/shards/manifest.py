"""The shards manifest: what a shards folder holds, read by everything downstream.

Usage:
    from distrain.shards.manifest import load_manifest
    m = load_manifest("data/fashion-mnist")          # a folder, its manifest.json, or an fsspec URL of either
    m.classes                                         # ['T-shirt_top', 'Trouser', ...]; index = label
    m.num_samples("train"), m.shard_urls("train")     # absolute URLs, ready for the data pipeline

Layout of `manifest.json` (format `distrain-shards/1`):
    {"format": "distrain-shards/1", "classes": [...],
     "splits": {"train": {"num_samples": N, "shards": [{"url": "train/train-000000.tar", "num_samples": n,
                                                        "bytes": b, "sha256": "..."}, ...],
                          "class_counts": [n_0, n_1, ...]}, ...},
     "skipped": [{"path": "...", "reason": "..."}], "ignored": {"hidden": n, ...},
     "source": "...", "created": "...", "options": {...}}
`class_counts` (samples per class index) and `ignored` (inputs left out by rule, e.g. hidden files) are
optional.
Next to it, `_info.json` describes the same shards in the layout timm's WebDataset reader reads (`timm_info`).
Shard URLs are relative to the manifest's folder, so a shards folder can be moved or uploaded to a bucket as it is;
absolute URLs (`s3://...`) are kept as they are. The manifest is written last, so one that exists names only
complete shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "distrain-shards/1"
MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"  # the same shards described for timm's WebDataset reader


class ManifestError(ValueError):
    """A shards folder or manifest that cannot be used, with the location in the message."""


@dataclass
class ShardInfo:
    url: str
    num_samples: int
    bytes: int = 0
    sha256: str = ""
    stamp: str = ""        # indexed shards: modification time or ETag when indexed (re-index reuses unchanged)
    labels: dict[str, int] = field(default_factory=dict)  # indexed shards: raw label (JSON text) → samples


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)  # samples per class index; [] when unknown


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    created: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    ignored: dict[str, int] = field(default_factory=dict)  # inputs left out by rule (hidden, extension)
    # where the loader finds label and image (data/layout.py): {"label": "cls", "label_names": false,
    # "image_key": ""} for distrain's own shards; `distrain shards index` records what other tools wrote
    layout: dict[str, Any] = field(default_factory=dict)
    location: str = ""  # the folder this manifest was read from (not saved)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"{self.location or 'manifest'}: no split '{name}' (splits: "
                                f"{', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def num_samples(self, split: str) -> int:
        return self.split(split).num_samples

    def shard_urls(self, split: str) -> list[str]:
        """Absolute URLs of the split's shards, in manifest order."""
        return [resolve_url(self.location, s.url) for s in self.split(split).shards]

    def shard_sizes(self, split: str) -> list[int]:
        return [s.num_samples for s in self.split(split).shards]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("location")
        order = ["format", "classes", "splits", "skipped", "ignored", "source", "created", "options", "layout"]
        return json.dumps({k: d[k] for k in order}, indent=2)


def figures(manifest: Manifest) -> dict[str, Any]:
    """The counts a build or an inspection reports: classes, samples and shards per split, bytes, skipped, ignored."""
    splits = manifest.splits.values()
    return {"classes": manifest.num_classes,
            "samples": {k: s.num_samples for k, s in manifest.splits.items()},
            "shards": {k: len(s.shards) for k, s in manifest.splits.items()},
            "bytes": sum(sh.bytes for s in splits for sh in s.shards),
            "skipped": len(manifest.skipped),
            "ignored": sum(manifest.ignored.values())}


def is_url(path: str) -> bool:
    return "://" in path


def resolve_url(base: str, url: str) -> str:
    """`url` made absolute against the folder `base` (a local path or URL)."""
    if is_url(url) or url.startswith("/") or not base:
        return url
    return base.rstrip("/") + "/" + url


def manifest_location(path: str) -> tuple[str, str]:
    """(folder, manifest URL) for a folder or a manifest.json path/URL."""
    path = str(path)
    path = path.removeprefix("file://")
    if path.endswith(".json"):
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        return folder, path
    return path.rstrip("/"), path.rstrip("/") + "/" + MANIFEST_NAME


def from_dict(d: dict, location: str = "") -> Manifest:
    try:
        splits = {name: SplitInfo(num_samples=int(s["num_samples"]),
                                  shards=[ShardInfo(**sh) for sh in s.get("shards", [])],
                                  class_counts=[int(c) for c in s.get("class_counts", [])])
                  for name, s in d["splits"].items()}
        return Manifest(classes=list(d["classes"]), splits=splits, skipped=list(d.get("skipped", [])),
                        source=d.get("source", ""), created=d.get("created", ""), options=d.get("options", {}),
                        format=d.get("format", FORMAT), ignored=dict(d.get("ignored", {})),
                        layout=dict(d.get("layout") or {}), location=location)
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{location or 'manifest'}: malformed manifest ({e!r})") from None


def load_manifest(path: str) -> Manifest:
    """Read the manifest of a shards folder (local path or any fsspec URL)."""
    import fsspec

    folder, url = manifest_location(path)
    try:
        with fsspec.open(url, "r") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"no shards manifest at {url} (build shards with `distrain shards build SOURCE "
                            f"--out {folder}`)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{url}: not valid JSON ({e})") from None
    return from_dict(d, location=folder)


def save_manifest(manifest: Manifest, folder: str) -> str:
    """Write `folder/manifest.json` atomically where the filesystem allows (local: temp file + rename)."""
    import fsspec

    _, url = manifest_location(folder)
    fs, fs_path = fsspec.core.url_to_fs(url)
    text = manifest.to_json()
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        tmp = fs_path + ".tmp"
        with fs.open(tmp, "w") as f:
            f.write(text)
        fs.mv(tmp, fs_path)
    else:
        with fs.open(fs_path, "w") as f:  # object stores: a PUT is atomic
            f.write(text)
    return url


def timm_info(manifest: Manifest, name: str = "") -> dict:
    """The `_info.json` that timm's WebDataset reader (`timm.data.create_dataset("wds/NAME", root=DIR,
    split=...)`) reads: per split its name, sample count, shard file names relative to the folder and their
    lengths."""
    return {
        "name": name,
        "num_classes": manifest.num_classes,
        "classes": list(manifest.classes),
        "splits": {split: {"name": split, "num_samples": info.num_samples,
                           "filenames": [s.url for s in info.shards],
                           "shard_lengths": [s.num_samples for s in info.shards]}
                   for split, info in manifest.splits.items()},
    }
