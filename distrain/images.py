"""Which files and which shard members are images: the one list.

Usage:
    from distrain.images import IMAGE_KEYS, IMAGE_SUFFIXES, image_key
    IMAGE_KEYS                   # sample extensions of shard members, in order of preference: ('jpg', 'jpeg', ...)
    ".jpg" in IMAGE_SUFFIXES     # file suffixes an image folder is searched for
    image_key({"cls": b"1", "png": b"..."})   # 'png': the member holding a sample's image, or None

A WebDataset sample is the set of tar members sharing a key; its image is the first member whose extension is in
IMAGE_KEYS (lower-cased, as the reader lower-cases extensions).
"""

from __future__ import annotations

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
IMAGE_SUFFIXES = frozenset({f".{k}" for k in IMAGE_KEYS} | {".jpe", ".jfif", ".gif", ".pgm", ".pbm", ".pnm"})
JPEG_KEYS = ("jpg", "jpeg")


def image_key(sample: dict) -> str | None:
    return next((k for k in IMAGE_KEYS if k in sample), None)
