"""Inputs of `distrain shards build`: an image folder, a CSV file or Fashion-MNIST, as labelled records.

Usage:
    from distrain.shards.sources import open_source
    src = open_source("photos/")                  # ImageFolder layout: photos/<class>/**/<image>
    src = open_source("labels.csv")               # `path,label` columns (+ optional `split`)
    src = open_source("fashion-mnist")            # Debian files, $DISTRAIN_FASHION_MNIST, or a download
    src.classes                                   # ['cat', 'dog']: index = label
    src.splits["train"][0]                        # Record(path='cat/0001.jpg', label=0, file='/abs/...')
    src.ignored                                   # {'hidden': 1, 'not an image extension': 3}

A source only lists and labels its inputs; decoding happens later, in the encode workers, where a broken file
becomes a counted skip. What can be known from the listing alone fails here, before anything is written, with
a `SourceError` naming the file, row or class: fewer than 2 classes, an empty class, a CSV label that names no
class. Everything is sorted, so the same input always gives the same records in the same order.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distrain.images import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """An input that cannot be turned into shards; raised before anything is written."""


@dataclass(slots=True)
class Record:
    """One labelled input. `path` is what the sample's json and the skipped list show (relative to the
    source); the bytes come from `file` (a local path or fsspec URL), or the image is already in `pixels`."""

    path: str
    label: int
    file: str = ""
    pixels: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Source:
    kind: str                          # 'folder', 'csv' or 'fashion-mnist'
    location: str                      # what the user named, resolved
    classes: list[str]
    splits: dict[str, list[Record]]    # 'train' always; 'val'/'test' when the source defines them
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def num_records(self) -> int:
        return sum(len(r) for r in self.splits.values())


def safe_name(name: str) -> str:
    """A class name that is safe in file names and URLs: 'T-shirt/top' → 'T-shirt_top'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "_"


def check_classes(classes: list[str], counts: Counter, where: str) -> None:
    """At least two classes, none empty, names unique."""
    if len(classes) < 2:
        raise SourceError(f"{where}: found {len(classes)} class{'es' if len(classes) != 1 else ''} "
                          f"({', '.join(classes) or 'none'}); a classifier needs at least 2")
    dupes = [n for n, c in Counter(classes).items() if c > 1]
    if dupes:
        raise SourceError(f"{where}: class names repeat: {', '.join(dupes)}")
    empty = [c for i, c in enumerate(classes) if counts.get(i, 0) == 0]
    if empty:
        raise SourceError(f"{where}: class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} "
                          f"{'have' if len(empty) > 1 else 'has'} no images")


def parse_classes(spec: str | list[str] | None) -> list[str] | None:
    """`--classes`: a comma-separated list, or a text file with one class name per line."""
    if spec is None or isinstance(spec, list):
        return spec
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
        return [n for n in names if n and not n.startswith("#")]
    return [n.strip() for n in spec.split(",") if n.strip()]


# ------------------------------------------------------------------------------------------------ ImageFolder


def _not_utf8(name: str) -> bool:
    """A file name that was not valid UTF-8 on disk (Python keeps its bytes as lone surrogates)."""
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def _walk_images(class_dir: Path, ignored: Counter, other_classes: list[Path] = ()) -> list[Path]:
    """Image files under class_dir (recursive, sorted). Counted and left out: hidden entries, other extensions,
    what is not a regular file (FIFOs, sockets, devices: opening a FIFO would block forever), broken links, and
    links into another class's folder (the same image under two labels)."""
    found, seen = [], set()
    others = [str(o.resolve()) + os.sep for o in other_classes]
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        ignored["hidden"] += sum(d.startswith(".") for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                ignored["hidden"] += 1
            elif os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                ignored["not an image extension"] += 1
            else:
                path = Path(dirpath) / name
                try:
                    st = path.stat()  # follows links
                except OSError:
                    ignored["broken link or unreadable"] += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    ignored["not a regular file (FIFO, socket, device)"] += 1
                elif path.is_symlink() and any(os.path.realpath(path).startswith(o) for o in others):
                    ignored["link into another class's folder"] += 1
                else:
                    found.append(path)
    return found


def folder_source(root: str | Path, classes: list[str] | None = None) -> Source:
    """ImageFolder layout: one sub-folder per class (sorted by name unless `classes` gives the order)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    ignored: Counter = Counter()
    folders = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            ignored["hidden"] += 1
        elif entry.is_dir():
            if _not_utf8(entry.name):
                raw = os.fsencode(entry.name)
                raise SourceError(f"{root}: class folder {raw!r} is not valid UTF-8, so its name cannot be a class "
                                  f"name in the manifest, the model folder or W&B; rename it (e.g. `convmv -f "
                                  f"latin1 -t utf8 --notest -r {root}`) and build again")
            folders[entry.name] = entry
        else:
            ignored["outside class folders"] += 1
    if classes is None:
        classes = sorted(folders)
    else:
        missing = [c for c in classes if c not in folders]
        if missing:
            many = len(missing) > 1
            raise SourceError(f"{root}: class{'es' if many else ''} {', '.join(map(repr, missing))} from "
                              f"--classes {'have' if many else 'has'} no folder")
        ignored["class folders not in --classes"] += len(set(folders) - set(classes))
    records, counts = [], Counter()
    for label, name in enumerate(classes):
        others = [folders[c] for c in classes if c != name]
        for f in _walk_images(folders[name], ignored, others):
            records.append(Record(path=f.relative_to(root).as_posix(), label=label, file=str(f)))
            counts[label] += 1
    check_classes(classes, counts, str(root))
    return Source("folder", str(root), list(classes), {"train": records}, dict(ignored))


# ------------------------------------------------------------------------------------------------------- CSV


def _labels_to_classes(labels: list[str], classes: list[str] | None, csv_path: Path,
                       lines: list[int]) -> tuple[list[str], list[int]]:
    """Map CSV label cells to indices. With `classes`, a cell is a class name (or an index into it); without,
    integer cells are indices (classes '0'..'max') and names are sorted."""
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        out = []
        for label, line in zip(labels, lines):
            if label in index:
                out.append(index[label])
            elif label.isdigit() and int(label) < len(classes):
                out.append(int(label))
            else:
                raise SourceError(f"{csv_path}:{line}: label {label!r} names no class (classes: "
                                  f"{', '.join(classes)})")
        return list(classes), out
    if labels and all(label.isdigit() for label in labels):
        top = max(int(label) for label in labels)
        return [str(i) for i in range(top + 1)], [int(label) for label in labels]
    names = sorted(set(labels))
    index = {c: i for i, c in enumerate(names)}
    return names, [index[label] for label in labels]


def csv_source(csv_path: str | Path, classes: list[str] | None = None) -> Source:
    """A CSV with `path,label` columns (and optionally `split`: train/val/test); relative paths resolve
    against the CSV's folder, URLs (s3://...) are read through fsspec. Rows are taken as given: no extension
    filter."""
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise SourceError(f"CSV file not found: {csv_path}")
    base = csv_path.parent
    paths, labels, splits, lines = [], [], [], []
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = csv_path.read_bytes()[:e.start].count(b"\n") + 1
        raise SourceError(f"{csv_path}:{line}: not UTF-8 text (byte {e.object[e.start]:#x}); save the CSV as "
                          f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            header_text = ", ".join(reader.fieldnames or []) or "none"
            raise SourceError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)} (header: {header_text})")
        for row in reader:
            line = reader.line_num
            path = (row.get(header["path"]) or "").strip()
            label = (row.get(header["label"]) or "").strip()
            if not path and not label:
                continue  # blank line
            if not path:
                raise SourceError(f"{csv_path}:{line}: empty path")
            if not label:
                raise SourceError(f"{csv_path}:{line}: empty label for {path}")
            split = (row.get(header["split"]) or "train").strip().lower() if "split" in header else "train"
            if split not in SPLITS:
                raise SourceError(f"{csv_path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
            paths.append(path)
            labels.append(label)
            splits.append(split)
            lines.append(line)
    names, indices = _labels_to_classes(labels, classes, csv_path, lines)
    check_classes(names, Counter(indices), str(csv_path))
    out: dict[str, list[Record]] = {}
    for path, label, split in zip(paths, indices, splits):
        file = path if "://" in path or os.path.isabs(path) else str(base / path)
        out.setdefault(split, []).append(Record(path=path, label=label, file=file))
    if "train" not in out:
        raise SourceError(f"{csv_path}: no rows for the train split")
    return Source("csv", str(csv_path), names, {s: out[s] for s in SPLITS if s in out}, {})


# --------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {  # split → (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# MD5 of the official files (zalandoresearch/fashion-mnist README); Debian recompresses them, so only
# downloads are checked against these.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                         "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_candidates() -> list[Path]:
    """Where the four .gz files may already be, in the order they are looked for."""
    out = []
    if os.environ.get("DISTRAIN_FASHION_MNIST"):
        out.append(Path(os.environ["DISTRAIN_FASHION_MNIST"]).expanduser())
    out.append(Path(FASHION_MNIST_DEBIAN))
    out.append(Path.cwd() / ".cache/debs/usr/share/datasets/fashion-mnist")  # `make fashion-mnist`, no root
    out.append(fashion_mnist_cache())
    return out


def fashion_mnist_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distrain" / "fashion-mnist"


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)


def _download(folder: Path, timeout: float = 30.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in FASHION_MNIST_MD5.items():
        target = folder / name
        if target.is_file():
            continue
        errors = []
        for mirror in FASHION_MNIST_MIRRORS:
            tmp = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
                digest = hashlib.md5(tmp.read_bytes()).hexdigest()
                if digest != md5:
                    raise OSError(f"MD5 {digest} != {md5}")
                tmp.rename(target)
                break
            except OSError as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{mirror + name}: {e}")
        else:
            raise OSError("; ".join(errors))


def find_fashion_mnist(candidates: list[Path] | None = None, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST .gz files: found, downloaded, or a SourceError that says how
    to install them."""
    candidates = fashion_mnist_candidates() if candidates is None else candidates
    for folder in candidates:
        if _has_all(folder):
            return folder
    problem = ""
    if download:
        cache = fashion_mnist_cache()
        try:
            _download(cache)
            return cache
        except OSError as e:
            problem = f" The download failed ({e})."
    raise SourceError(
        f"Fashion-MNIST not found (looked in {', '.join(map(str, candidates))}).{problem} Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or without root run `make fashion-mnist` in the "
        f"distrain checkout (it extracts the Debian package into .cache/debs), or set "
        f"DISTRAIN_FASHION_MNIST to a folder holding {', '.join(FASHION_MNIST_MD5)}.")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array: (N,) labels or (N, H, W) images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: IDX header says {dims} but holds {body.size} bytes (truncated download?)")
    return body.reshape(dims)


def fashion_mnist_source(folder: Path | None = None, download: bool = True) -> Source:
    """Fashion-MNIST: the official train set (split into train/val later) and its own test set; 28×28 gray."""
    folder = folder or find_fashion_mnist(download=download)
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(folder / images_name), read_idx(folder / labels_name)
        if len(images) != len(labels) or images.ndim != 3:
            raise SourceError(f"{folder}: {images_name} and {labels_name} do not match")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise SourceError(f"{folder / labels_name}: label {labels.max()} out of range")
        splits[split] = [Record(path=f"{images_name}#{i}", label=int(labels[i]), pixels=images[i])
                         for i in range(len(images))]
    return Source("fashion-mnist", str(folder), [safe_name(c) for c in FASHION_MNIST_CLASSES], splits, {})


# ---------------------------------------------------------------------------------------------------- choose


def open_source(spec: str, classes: list[str] | str | None = None, download: bool = True) -> Source:
    """`fashion-mnist`, a `.csv` file, or an image folder."""
    classes = parse_classes(classes)
    if spec.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        if classes is not None:
            raise SourceError("--classes does not apply to fashion-mnist (its classes are fixed)")
        return fashion_mnist_source(download=download)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".csv" or path.is_file():
        return csv_source(path, classes)
    if not path.exists():
        raise SourceError(f"source not found: {spec} (give an image folder, a .csv file or `fashion-mnist`)")
    return folder_source(path, classes)
