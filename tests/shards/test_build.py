"""Shards: build from real image files (odd modes, broken ones among them), read back, verify; config loader.

Every test writes real JPEG/PNG files and real tar shards and reads them back with the webdataset library or
timm's WebDataset reader; the CLI runs in-process through `distrain.cli.main` and once as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distrain.cli import main
from distrain.cli.shards import byte_size
from distrain.shards.build import BuildOptions, build_shards
from distrain.shards.manifest import load_manifest
from distrain.shards.sources import SourceError, find_fashion_mnist, open_source
from distrain.shards.split import class_quotas, plan_splits
from distrain.shards.verify import verify_shards
from tests.helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- helpers


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, RGB or RGBA) written by hand: PIL cannot write 16-bit colour PNGs."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# path (relative to the source) → expected RGB of the decoded sample, for the images in unusual modes
ODD_MODES = {
    "class_0/cmyk.jpg": (255, 0, 0),
    "class_0/gray.png": (128, 128, 128),
    "class_0/palette.png": (0, 0, 255),
    "class_1/alpha.png": None,            # left half transparent → white, right half opaque green
    "class_1/gray16.png": (128, 128, 128),
    "class_1/rgb16.png": (255, 0, 128),
    "class_2/rotated.jpg": None,          # EXIF orientation 6: stored 40×20, upright 20×40
    "class_2/gray.jpg": (90, 90, 90),
}
BROKEN = {"class_0/truncated.jpg": "truncated", "class_1/empty.jpg": "empty file",
          "class_2/text.jpg": "not an image"}


def make_messy_folder(root: Path) -> Path:
    """3 classes × 12 ordinary JPEGs, images in odd modes, broken files, a hidden file and a .txt file."""
    make_image_folder(root, num_classes=3, per_class=12, size=32)
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "class_0/cmyk.jpg", quality=95)
    Image.new("L", (24, 24), 128).save(root / "class_0/gray.png")
    Image.new("RGB", (24, 24), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "class_0/palette.png")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[:, 12:] = (0, 200, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "class_1/alpha.png")
    Image.fromarray(np.full((24, 24), 128 * 257, np.uint16)).save(root / "class_1/gray16.png")  # mode I;16
    rgb16 = np.zeros((24, 24, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 128 * 257
    (root / "class_1/rgb16.png").write_bytes(png16(rgb16))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 100, 50)).save(root / "class_2/rotated.jpg", exif=exif, quality=95)
    Image.new("L", (24, 24), 90).save(root / "class_2/gray.jpg", quality=95)
    good = (root / "class_0/0000.jpg").read_bytes()
    (root / "class_0/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_1/empty.jpg").write_bytes(b"")
    (root / "class_2/text.jpg").write_text("this is not a JPEG\n")
    (root / "class_0/.hidden.jpg").write_bytes(good)
    (root / "class_1/notes.txt").write_text("labelled by hand\n")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str, dict | None]:
    """distrain.cli.main in-process: (exit code, stdout, stderr, the final JSON line or None)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return code, out, err, figures


def read_split(out: Path, split: str) -> list[dict]:
    """Every sample of a split, read with the webdataset library (images decoded to RGB arrays)."""
    urls = load_manifest(str(out)).shard_urls(split)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    return list(ds)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("messy") / "images")


# ------------------------------------------------------------------------------------------------- building


@pytest.mark.timeout(120)
def test_build_reads_back_every_sample(messy, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, _, figures = run_cli(capsys, "shards", "build", str(messy), "--out", str(out),
                                       "--shard-size", "7", "--val-fraction", "0.25", "--workers", "2",
                                       "--quiet")
    assert code == 0
    m = load_manifest(str(out))
    assert m.classes == ["class_0", "class_1", "class_2"]
    # 36 ordinary + 8 odd-mode images written; 3 broken skipped; hidden + .txt ignored
    assert figures["samples"]["train"] + figures["samples"]["val"] == 44
    assert figures["skipped"] == 3 and figures["ignored"] == 2
    assert m.ignored == {"hidden": 1, "not an image extension": 1}
    assert {s["path"]: s["reason"] for s in m.skipped}.keys() == BROKEN.keys()
    for s in m.skipped:
        assert BROKEN[s["path"]] in s["reason"]
    assert "train" in stdout and "skipped 3" in stdout  # the summary table

    seen = {}
    for split in ("train", "val"):
        samples = read_split(out, split)
        info = m.split(split)
        assert len(samples) == info.num_samples == sum(s.num_samples for s in info.shards)
        assert all(s.num_samples <= 7 for s in info.shards)
        assert Counter(s["cls"] for s in samples) == {i: n for i, n in enumerate(info.class_counts) if n}
        for s in samples:
            assert "." not in s["__key__"] and s["__key__"].startswith(split + "_")
            meta = s["json"]
            assert meta["path"].split("/")[0] == m.classes[s["cls"]] and meta["label"] == s["cls"]
            assert s["jpg"].ndim == 3 and s["jpg"].shape[2] == 3 and s["jpg"].dtype == np.uint8
            seen[meta["path"]] = (s["jpg"], meta)
    assert len(seen) == 44  # every input written exactly once over both splits

    for path, rgb in ODD_MODES.items():
        pixels, meta = seen[path]
        if rgb is not None:
            assert np.abs(pixels.reshape(-1, 3).mean(0) - rgb).max() < 8, path
    alpha, _ = seen["class_1/alpha.png"]
    assert alpha[:, :8].min() > 240                                     # transparent → white
    assert np.abs(alpha[:, 16:].reshape(-1, 3).mean(0) - (0, 200, 0)).max() < 8
    rotated, meta = seen["class_2/rotated.jpg"]
    assert rotated.shape[:2] == (40, 20) and meta["original_size"] == [20, 40]  # EXIF orientation applied


@pytest.mark.timeout(60)
def test_split_is_stratified_and_reproducible(tmp_path):
    src = tmp_path / "images"
    for c, n in enumerate((10, 20, 30)):  # unequal classes
        make_image_folder(tmp_path / f"tmp{c}", num_classes=1, per_class=n, size=16, seed=c)
        shutil.move(tmp_path / f"tmp{c}" / "class_0", src / f"class_{c}")
    opts = {"val_fraction": 0.2, "shard_size": 8}
    a = build_shards(str(src), str(tmp_path / "a"), BuildOptions(**opts, workers=1)).manifest
    b = build_shards(str(src), str(tmp_path / "b"), BuildOptions(**opts, workers=2)).manifest
    c = build_shards(str(src), str(tmp_path / "c"), BuildOptions(**opts, seed=1, workers=1)).manifest
    assert a.split("val").class_counts == [2, 4, 6] and a.split("train").class_counts == [8, 16, 24]
    # same seed: byte-identical shards, whatever the number of workers
    digests = [[s.sha256 for s in m.split(k).shards] for m in (a, b) for k in ("train", "val")]
    assert digests[:2] == digests[2:]
    for k in ("train", "val"):
        for x, y in zip(sorted((tmp_path / "a" / k).iterdir()), sorted((tmp_path / "b" / k).iterdir())):
            assert x.read_bytes() == y.read_bytes()
    # another seed: same class counts, other members
    assert c.split("val").class_counts == [2, 4, 6]
    val_paths = {m: {s["json"]["path"] for s in read_split(tmp_path / m, "val")} for m in ("a", "c")}
    assert val_paths["a"] != val_paths["c"]
    # train and val never share an input
    train_paths = {s["json"]["path"] for s in read_split(tmp_path / "a", "train")}
    assert not train_paths & val_paths["a"] and len(train_paths | val_paths["a"]) == 60


def test_limit_is_stratified_per_split(tmp_path):
    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=20, size=16)
    m = build_shards(str(src), str(tmp_path / "out"), BuildOptions(limit=12, workers=1)).manifest
    assert m.split("train").class_counts == [4, 4, 4]
    assert m.split("val").class_counts == [2, 2, 2]  # 10% of 20 per class, under the limit
    assert class_quotas({0: 50, 1: 30, 2: 2}, 10) == {0: 6, 1: 3, 2: 1}
    assert byte_size("64MB") == 64_000_000 and byte_size("1GiB") == 2**30 and byte_size("0") == 0
    assert sum(class_quotas({0: 7, 1: 5, 2: 1, 3: 1}, 3).values()) == 3


def test_lossless_resize_and_shard_bytes(tmp_path):
    src = make_image_folder(tmp_path / "images", num_classes=2, per_class=6, size=64, fmt="PNG")
    out = tmp_path / "out"
    m = build_shards(str(src), str(out), BuildOptions(lossless=True, max_side=24, shard_bytes=20_000,
                                                      shard_size=0, val_fraction=0, workers=1)).manifest
    assert list(m.splits) == ["train"] and m.num_samples("train") == 12
    assert len(m.split("train").shards) > 1 and all(s.bytes <= 20_480 for s in m.split("train").shards)
    samples = read_split(out, "train")
    assert all("png" in s and s["png"].shape == (24, 24, 3) for s in samples)
    # lossless: the pixels are exactly the source's, shrunk the way PIL shrinks them
    s = samples[0]
    ref = Image.open(src / s["json"]["path"]).convert("RGB").resize((24, 24), Image.Resampling.BICUBIC,
                                                                     reducing_gap=3.0)
    assert np.array_equal(s["png"], np.asarray(ref))


def test_timm_reads_the_shards(tmp_path):
    from timm.data import create_dataset

    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=8, size=16)
    out = tmp_path / "out"
    m = build_shards(str(src), str(out), BuildOptions(shard_size=5, workers=1)).manifest
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == m.shard_sizes("train")
    for split in ("train", "val"):
        ds = create_dataset("wds/shards", root=str(out), split=split, is_training=False)
        items = list(ds)
        assert len(items) == len(ds) == m.num_samples(split)
        assert Counter(t for _, t in items) == dict(enumerate(m.split(split).class_counts))
        assert items[0][0].mode == "RGB"


# ------------------------------------------------------------------------------------------------- inspect


@pytest.mark.timeout(60)
def test_inspect_and_verify_catch_tampering(messy, tmp_path, capsys):
    out = tmp_path / "shards"
    build_shards(str(messy), str(out), BuildOptions(shard_size=10, workers=1))
    code, stdout, _, figures = run_cli(capsys, "shards", "inspect", str(out), "--verify", "--decode", "-q")
    assert code == 0 and figures["verified"] is True and figures["problems"] == 0
    assert "class_0" in stdout and "class_1/empty.jpg" in stdout and "verified" in stdout

    shards = sorted((out / "train").glob("*.tar"))
    data = bytearray(shards[1].read_bytes())
    data[700] ^= 0xFF  # one flipped bit pattern inside the first image of the second shard
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:3000])  # truncated
    code, stdout, _, figures = run_cli(capsys, "shards", "inspect", str(out), "--verify", "-q")
    assert code == 1 and figures["verified"] is False
    assert f"{shards[1].parent.name}/{shards[1].name}: sha256" in stdout
    assert f"{shards[2].name}: " in stdout.split(shards[1].name)[-1]
    shards[3].unlink()
    _, stdout, _, _ = run_cli(capsys, "shards", "inspect", str(out), "--verify", "-q")
    assert f"{shards[3].name}: missing" in stdout


# -------------------------------------------------------------------------------------------------- sources


def test_csv_source(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", num_classes=3, per_class=5, size=16)
    rows = ["path,label"]
    for c, name in enumerate(("cat", "dog", "eel")):
        rows += [f"images/class_{c}/{i:04d}.jpg,{name}" for i in range(5)]
    rows.append("images/class_0/missing.jpg,cat")
    rows.append(f"{images / 'class_1' / '0000.jpg'},dog")  # absolute path
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    code, *_ = run_cli(capsys, "shards", "build", str(csv_path), "--out", str(tmp_path / "out"),
                       "--val-fraction", "0", "--workers", "1", "-q")
    assert code == 0
    m = load_manifest(str(tmp_path / "out"))
    assert m.classes == ["cat", "dog", "eel"] and m.split("train").class_counts == [5, 6, 5]
    assert m.skipped == [{"path": "images/class_0/missing.jpg", "split": "train", "reason": "file not found"}]

    # --classes fixes the order; a label outside it fails before anything is written
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimages/class_0/0000.jpg,cat\nimages/class_1/0000.jpg,dgo\n")
    code, _, err, _ = run_cli(capsys, "shards", "build", str(bad), "--out", str(tmp_path / "bad"),
                              "--classes", "cat,dog")
    assert code == 2 and "bad.csv:3" in err and "'dgo' names no class" in err
    assert not (tmp_path / "bad").exists()

    # integer labels are class indices; a missing index is an empty class
    ints = tmp_path / "ints.csv"
    ints.write_text("path,label,split\nimages/class_0/0000.jpg,0,train\nimages/class_2/0000.jpg,2,train\n")
    with pytest.raises(SourceError, match="'1' has no images"):
        open_source(str(ints))
    ints.write_text("path,label,split\nimages/class_0/0000.jpg,0,train\nimages/class_1/0000.jpg,1,val\n"
                    "images/class_0/0001.jpg,0,test\nimages/class_1/0001.jpg,1,train\n")
    src = open_source(str(ints))
    assert src.classes == ["0", "1"] and {k: len(v) for k, v in src.splits.items()} == {"train": 2, "val": 1,
                                                                                        "test": 1}
    missing_col = tmp_path / "nocol.csv"
    missing_col.write_text("file,label\na.jpg,x\n")
    with pytest.raises(SourceError, match="missing column path"):
        open_source(str(missing_col))


def test_bad_requests_fail_before_writing(tmp_path, capsys):
    one = make_image_folder(tmp_path / "one", num_classes=1, per_class=3, size=16)
    code, _, err, _ = run_cli(capsys, "shards", "build", str(one), "--out", str(tmp_path / "o1"))
    assert code == 2 and "a classifier needs at least 2" in err and not (tmp_path / "o1").exists()

    empty = make_image_folder(tmp_path / "empty", num_classes=2, per_class=3, size=16)
    (empty / "class_2").mkdir()
    (empty / "class_2" / "readme.txt").write_text("no images here")
    code, _, err, _ = run_cli(capsys, "shards", "build", str(empty), "--out", str(tmp_path / "o2"))
    assert code == 2 and "'class_2' has no images" in err and not (tmp_path / "o2").exists()

    good = make_image_folder(tmp_path / "good", num_classes=2, per_class=4, size=16)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err, _ = run_cli(capsys, "shards", "build", str(good), "--out", str(out))
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    # --overwrite deletes only shards distrain can show it made: a folder without their manifest is refused whole
    # (before issue 13 a stray .tar there was deleted as "stale")
    (out / "train").mkdir()
    (out / "train" / "train-000099.tar").write_bytes(b"stale")
    code, _, err, _ = run_cli(capsys, "shards", "build", str(good), "--out", str(out), "--overwrite", "-q")
    assert code == 2 and "holds files but no manifest of distrain-built shards: nothing was deleted" in err
    assert (out / "train" / "train-000099.tar").read_bytes() == b"stale" and (out / "keep.txt").exists()

    # over distrain's own shards, --overwrite writes the new ones beside the old, swaps the manifest, then deletes
    # the old shards (what the old manifest listed) and keeps unrelated files
    built = tmp_path / "built"
    run_cli(capsys, "shards", "build", str(good), "--out", str(built), "--workers", "1", "-q")
    old = sorted(p.relative_to(built).as_posix() for p in built.rglob("*.tar"))
    (built / "keep.txt").write_text("mine")
    (built / "train" / "train-000099.tar").write_bytes(b"not listed")
    code, _, _, figures = run_cli(capsys, "shards", "build", str(good), "--out", str(built), "--overwrite",
                                  "--workers", "1", "-q")
    assert code == 0 and figures["samples"] == {"train": 6, "val": 2}
    assert not any((built / rel).exists() for rel in old)
    assert (built / "keep.txt").exists() and (built / "train" / "train-000099.tar").read_bytes() == b"not listed"
    manifest = load_manifest(str(built))
    assert all(s.url.startswith("build-") for s in manifest.splits["train"].shards)
    assert verify_shards(manifest).ok

    code, _, err, _ = run_cli(capsys, "shards", "build", str(good), "--out", str(tmp_path / "q"), "--quality",
                              "0")
    assert code == 2 and "--quality" in err


# --------------------------------------------------------------------------------------------- fashion-mnist


def _fashion_mnist_dir() -> Path:
    try:
        return find_fashion_mnist(download=False)
    except SourceError as e:
        pytest.skip(str(e))


def test_fashion_mnist_subset(tmp_path, capsys):
    _fashion_mnist_dir()
    out = tmp_path / "fm"
    code, _, _, figures = run_cli(capsys, "shards", "build", "fashion-mnist", "--out", str(out),
                                  "--limit", "50", "--workers", "1", "--no-download", "-q")
    assert code == 0 and figures["samples"] == {"train": 50, "val": 50, "test": 50}
    m = load_manifest(str(out))
    assert m.classes[0] == "T-shirt_top" and m.classes[9] == "Ankle_boot" and len(m.classes) == 10
    for split in ("train", "val", "test"):
        assert m.split(split).class_counts == [5] * 10  # stratified: the official sets are balanced
    samples = read_split(out, "test")
    assert all(s["jpg"].shape == (28, 28, 3) for s in samples)
    assert all(s["json"]["path"].startswith("t10k-images-idx3-ubyte.gz#") for s in samples)
    assert not {s["json"]["path"] for s in read_split(out, "train")} & {s["json"]["path"]
                                                                         for s in read_split(out, "val")}


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(SourceError) as e:
        find_fashion_mnist([tmp_path / "nowhere"], download=False)
    assert "sudo apt-get install dataset-fashion-mnist" in str(e.value)
    assert "make fashion-mnist" in str(e.value)
    assert "DISTRAIN_FASHION_MNIST" in str(e.value)


# ---------------------------------------------------------------------------------------- process behaviour


@pytest.mark.timeout(120)
def test_subprocess_build_and_interrupt(tmp_path):
    src = make_image_folder(tmp_path / "images", num_classes=2, per_class=6, size=16)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distrain", "shards", "build", str(src), "--out", str(tmp_path / "out"),
           "--workers", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=100,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["samples"] == {"train": 10, "val": 2} and figures["skipped"] == 0
    assert figures["images_per_s"] > 0

    # Interrupt a longer rebuild (--overwrite of the finished one) once its first shard exists: the old dataset
    # stays whole (its manifest names its own complete shards, which still verify), the interrupted build's shards
    # are gone, and no temp file stays.
    big = make_image_folder(tmp_path / "big", num_classes=2, per_class=20, size=256, seed=1)
    for f in list(big.rglob("*.jpg")):  # 400 inputs, cheaply
        for k in range(1, 10):
            shutil.copyfile(f, f.with_name(f"{f.stem}-{k}.jpg"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "distrain", "shards", "build", str(big), "--out", str(out), "--overwrite",
           "--shard-size", "4", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    before = (out / "manifest.json").read_text()
    deadline = time.monotonic() + 90
    while not list(out.glob("build-*/train/train-000001.tar")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "build finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert (out / "manifest.json").read_text() == before and (out / "_info.json").exists()
    assert not list(out.glob("build-*")) and not list(out.rglob("*.tmp"))
    assert verify_shards(load_manifest(str(out))).ok
    for shard in (out / "train").glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) % 3 == 0  # whole samples × (jpg, cls, json)


@pytest.mark.timeout(120)
def test_build_and_verify_on_s3(tmp_path, monkeypatch, capsys):
    """Writes through fsspec to an S3 API (moto's server on loopback), then inspects and verifies there."""
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}",
                                                       "key": "testing", "secret": "testing"})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("shards-test")
        src = make_image_folder(tmp_path / "images", num_classes=2, per_class=5, size=16)
        code, _, _, figures = run_cli(capsys, "shards", "build", str(src), "--out", "s3://shards-test/set",
                                      "--shard-size", "3", "--workers", "1", "-q")
        assert code == 0 and figures["samples"] == {"train": 8, "val": 2}
        m = load_manifest("s3://shards-test/set")
        assert m.shard_urls("train")[0] == "s3://shards-test/set/train/train-000000.tar"
        code, _, _, figures = run_cli(capsys, "shards", "inspect", "s3://shards-test/set", "--verify", "-q")
        assert code == 0 and figures["verified"] is True
        code, _, err, _ = run_cli(capsys, "shards", "build", str(src), "--out", "s3://shards-test/set")
        assert code == 2 and "not empty" in err
        with fsspec.open("s3://shards-test/set/train/train-000000.tar", "rb") as f, \
                tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            names = tar.getnames()
        assert names[:3] == ["train_0000000.jpg", "train_0000000.cls", "train_0000000.json"]
    finally:
        server.stop()


def test_plan_splits_keeps_source_splits():
    from distrain.shards.sources import Record

    records = [Record(f"{i}.jpg", i % 2) for i in range(20)]
    plan = plan_splits({"train": records, "test": records[:6]}, val_fraction=0.5, limit=0, seed=3)
    assert [len(plan[k]) for k in ("train", "val", "test")] == [10, 10, 6]
    again = plan_splits({"train": records, "test": records[:6]}, val_fraction=0.5, limit=0, seed=3)
    assert [r.path for r in plan["train"]] == [r.path for r in again["train"]]
    order = [r.path for r in plan["train"]]
    assert order != sorted(order, key=lambda p: int(p[:-4]))  # shuffled, not in source order


def test_odd_entries_in_image_folders_are_counted_not_read(tmp_path, capsys):
    """FIFOs, sockets and links into another class's folder are left out and counted; opening the FIFO would have
    blocked the build forever."""
    src = make_image_folder(tmp_path / "images", num_classes=2, per_class=4, size=16)
    os.mkfifo(src / "class_0" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "class_0" / "live.jpg"))
    (src / "class_1" / "stolen.jpg").symlink_to(src / "class_0" / "0000.jpg")  # the same image, other label
    (src / "class_1" / "own.jpg").symlink_to(src / "class_1" / "0000.jpg")     # a link within its class is fine
    (src / "class_1" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    try:
        code, _, _, figures = run_cli(capsys, "shards", "build", str(src), "--out", str(tmp_path / "out"),
                                      "--workers", "1", "-q", "--val-fraction", "0")
    finally:
        sock.close()
    assert code == 0 and figures["samples"] == {"train": 9}
    ignored = load_manifest(str(tmp_path / "out")).ignored
    assert ignored["not a regular file (FIFO, socket, device)"] == 2
    assert ignored["link into another class's folder"] == 1 and ignored["broken link or unreadable"] == 1


def test_class_folders_and_csv_files_that_are_not_utf8_are_refused_up_front(tmp_path, capsys):
    src = make_image_folder(tmp_path / "images", num_classes=2, per_class=3, size=16)
    os.rename(src / "class_1", os.path.join(os.fsencode(src), b"caf\xe9"))  # a Latin-1 name from another system
    code, _, err, _ = run_cli(capsys, "shards", "build", str(src), "--out", str(tmp_path / "out"))
    assert code == 2 and "class folder b'caf\\xe9' is not valid UTF-8" in err and "convmv" in err
    assert not (tmp_path / "out").exists()
    csv_file = tmp_path / "labels.csv"
    csv_file.write_bytes(b"path,label\nimages/class_0/0000.jpg,cat\nimages/class_0/0001.jpg,caf\xe9\n")
    code, _, err, _ = run_cli(capsys, "shards", "build", str(csv_file), "--out", str(tmp_path / "out2"))
    assert code == 2 and "labels.csv:3: not UTF-8 text (byte 0xe9)" in err


@pytest.mark.parametrize("argv,message", [
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--shard-size", "-5"], "argument --shard-size: must be >= 0, got -5"),
    (["--val-fraction", "inf"], "argument --val-fraction: expected a finite number, got 'inf'"),
    (["--quality", "101"], "argument --quality: must be between 1 and 100, got 101"),
])
def test_bad_numbers_on_the_command_line_are_one_line(tmp_path, argv, message):
    out = subprocess.run([sys.executable, "-m", "distrain", "shards", "build", str(tmp_path), "--out",
                          str(tmp_path / "o"), *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(message)
    assert "Traceback" not in out.stderr
