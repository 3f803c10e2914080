"""decode=gpu with the CPU as the device: the same random draws as the CPU pipeline, the same pixels at strength 0
within a stated tolerance, the same statistics at strength > 0, exact-once validation unchanged.

Real parts only: photo-like JPEGs of several sizes and a PNG in real tar shards, read by the real loader; the device
side is distrain.data.gpu.GpuDecode running torchvision's CPU JPEG decoder.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.data import create_loader
from distrain.data.augment import aug_params, draw
from distrain.data.gpu import GpuDecode
from distrain.shards.manifest import Manifest, ShardInfo, SplitInfo, save_manifest

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 48
# Resize filters differ (OpenCV's INTER_AREA after libjpeg's DCT scaling vs an antialiased bilinear filter), so
# pixels agree to a few levels, not exactly: mean |difference| < 3 levels of 255 and 99 % of pixels within 16.
MEAN_TOLERANCE, P99_TOLERANCE = 3.0, 16.0


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image with edges (gradients plus blobs): what resize filters see in photos, unlike pure noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / (7 + 5 * c) + yy / (11 + 3 * c) + rng.uniform(0, 6)) for c in range(3)],
                   -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_shards(root: Path, per_shard: int, shards: int, png_every: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    infos, k = [], 0
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(per_shard):
                h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
                buf = io.BytesIO()
                png = png_every and k % png_every == 0
                Image.fromarray(_photo(rng, h, w)).save(buf, "PNG" if png else "JPEG", quality=92)
                for ext, data in ((("png" if png else "jpg"), buf.getvalue()), ("cls", str(k % 3).encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
        infos.append(ShardInfo(name, per_shard))
    split = SplitInfo(len(infos) * per_shard, infos)
    save_manifest(Manifest(classes=["a", "b", "c"], splits={"train": split, "val": split}), root / "manifest.json")
    return root


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("photos"), per_shard=20, shards=3, png_every=7)


def _batches(shards, decode, strength, train=True, limit=0, batch_size=10, workers=0):
    loader = create_loader(shards, "train" if train else "val", train=train, batch_size=batch_size,
                           loader_workers=workers, image_size=SIZE, aug_strength=strength, seed=5, limit=limit,
                           decode=decode)
    return list(loader)


def test_strength_zero_matches_the_cpu_pipeline_within_tolerance(photo_shards):
    prepare = GpuDecode("cpu", MEAN, STD, SIZE, channels_last=False)
    cpu, gpu = _batches(photo_shards, "cpu", 0.0, train=False), _batches(photo_shards, "gpu", 0.0, train=False)
    assert [b.keys for b in cpu] == [b.keys for b in gpu]
    diffs = []
    jpeg_rows = 0
    for a, b in zip(cpu, gpu):
        assert b.encoded is not None and b.draws is not None
        jpeg_rows += sum(e is not None for e in b.encoded)
        pixels = prepare.pixels(b)
        assert pixels.shape == (len(b), 3, SIZE, SIZE)
        diffs.append((pixels - a.images.float()).abs()[b.valid].flatten())
    d = torch.cat(diffs)
    assert jpeg_rows == 60 - 9  # every 7th of 60 samples is a PNG: decoded by the worker, not the device
    assert float(d.mean()) < MEAN_TOLERANCE, float(d.mean())
    assert float(d.quantile(0.99)) <= P99_TOLERANCE, float(d.quantile(0.99))
    # the model's input: normalized like BatchToDevice
    x = prepare(gpu[0])
    from distrain.data import to_device

    ref = to_device(prepare.images(gpu[0]), "cpu", MEAN, STD, channels_last=False)
    assert torch.allclose(x, ref, atol=1e-5)


def test_the_workers_make_the_cpu_pipelines_draws(photo_shards):
    """decode=gpu batches carry the draws the CPU path makes from the same seed: the same samples in the same
    order (the generator is consumed identically), and the same draws again on a second read."""
    gpu, cpu = _batches(photo_shards, "gpu", 0.6, workers=2), _batches(photo_shards, "cpu", 0.6, workers=2)
    assert [b.keys for b in gpu] == [b.keys for b in cpu]
    again = _batches(photo_shards, "gpu", 0.6, workers=2)
    for a, b in zip(gpu, again):
        for da, db in zip(a.draws, b.draws):
            assert (da is None) == (db is None)
            if da is not None:
                assert (da.box, da.flip, da.ops, da.jitter, da.erase) == (db.box, db.flip, db.ops, db.jitter, db.erase)
    drawn = [d for b in gpu for d in b.draws if d is not None]
    assert len(drawn) > 30 and 0 < sum(d.flip for d in drawn) < len(drawn)


def test_same_draw_same_image_on_both_pipelines(photo_shards):
    """One JPEG, one seed: ImageTransform (CPU) and GpuDecode (device) apply the same crop, flip and jitter: the
    images agree within the resize tolerance (RandAugment's threshold ops and erasing's random fill excluded)."""
    import tarfile as tf

    from distrain.data import ImageTransform
    from distrain.data.dataset import Batch
    from distrain.data.decode import decode_crop
    from distrain.data.ops import apply

    t = ImageTransform(SIZE, 0.5, train=True)
    prepare = GpuDecode("cpu", MEAN, STD, SIZE, channels_last=False)
    with tf.open(photo_shards / "train-000001.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    diffs = []
    for i, data in enumerate(jpegs):
        d = t.draw_for(data, "jpg", np.random.default_rng(i))
        d.ops = [op for op in d.ops if op[0] not in ("Solarize", "Posterize", "Equalize", "AutoContrast")]
        d.erase = None
        # the CPU image for exactly this (trimmed) draw, through the CPU pixel ops
        cpu = apply(decode_crop(data, "jpg", lambda h, w, box=d.box: box, SIZE, fast=True), d)
        batch = Batch(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                      torch.ones(1, dtype=torch.bool), ["k"], encoded=[data], draws=[d])
        gpu = prepare.pixels(batch)[0].permute(1, 2, 0)
        diffs.append(float((gpu - torch.from_numpy(cpu).float()).abs().mean()))
    assert len(diffs) >= 15
    assert float(np.median(diffs)) < 4.0, diffs
    assert max(diffs) < 20.0, diffs


def test_draw_statistics_match_the_cpu_pipelines_definition():
    """Over 4,000 draws: crop area within the strength's scale range with the RandomResizedCrop distribution,
    flip rate 0.5, jitter factors uniform in 1 ± 0.4 s, RandAugment and erasing at their probabilities."""
    s = 0.5
    p = aug_params(s)
    rng = np.random.default_rng(0)
    draws = [draw(300, 400, SIZE, p, rng) for _ in range(4000)]
    areas = np.array([d.box[2] * d.box[3] / (300 * 400) for d in draws])
    assert areas.min() >= p.crop_scale[0] - 0.01 and areas.max() <= 1.0
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    jit = np.array([d.jitter for d in draws])
    assert jit.min() >= 1 - p.color_jitter and jit.max() <= 1 + p.color_jitter
    assert abs(jit.mean() - 1) < 0.01 and abs(jit.std() - p.color_jitter / np.sqrt(3)) < 0.01
    assert abs(np.mean([len(d.ops) for d in draws]) - p.randaug_ops * p.randaug_prob) < 0.05
    assert abs(np.mean([d.erase is not None for d in draws]) - p.erase_prob) < 0.03


def test_augmented_gpu_pixels_follow_the_draws(photo_shards):
    """At strength > 0 the device output differs from the strength-0 crop exactly where the draw says so: flipped
    rows are the mirror image, and pixel statistics stay in range."""
    prepare = GpuDecode("cpu", MEAN, STD, SIZE, channels_last=True)
    batches = _batches(photo_shards, "gpu", 0.4)
    cpu = _batches(photo_shards, "cpu", 0.4)
    for g, c in zip(batches, cpu):
        x = prepare(g)
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
        pix = prepare.images(g).float()
        # the mean brightness of each image agrees with the CPU pipeline's augmented one (same draws, other filters)
        rows = [i for i, d in enumerate(g.draws) if d is not None and d.erase is None]
        gm = pix[rows].mean((1, 2, 3))
        cm = c.images[rows].float().mean((1, 2, 3))
        assert float((gm - cm).abs().mean()) < 8.0
    # a flip-only draw gives the mirror of the unflipped crop
    b = batches[0]
    i = next(i for i, d in enumerate(b.draws) if d is not None)
    from dataclasses import replace

    plain = replace(b.draws[i], flip=False, ops=[], jitter=None, erase=None, affine=None)
    flipped = replace(plain, flip=True)
    one = lambda d: replace(b, draws=[d if j == i else None for j in range(len(b))],  # noqa: E731
                            encoded=[e if j == i else None for j, e in enumerate(b.encoded)])
    assert torch.equal(prepare.pixels(one(plain))[i].flip(-1), prepare.pixels(one(flipped))[i])


def test_validation_is_exact_once_with_gpu_decode(photo_shards):
    cpu = _batches(photo_shards, "cpu", 0.0, train=False, batch_size=7, workers=2)
    gpu = _batches(photo_shards, "gpu", 0.0, train=False, batch_size=7, workers=2)
    keys = lambda bs: sorted(k for b in bs for k, v in zip(b.keys, b.valid) if v)  # noqa: E731
    assert keys(gpu) == keys(cpu) and len(keys(gpu)) == 60 and len(set(keys(gpu))) == 60
    assert len(gpu) == len(cpu)
