"""Decode one input image robustly and encode it as a shard sample (runs in the encode worker processes).

Usage:
    from distrain.shards.encode import EncodeOptions, encode_record, encode_chunk
    sample = encode_record(record, EncodeOptions(max_side=512, quality=90))
    sample.ok, sample.ext, len(sample.image), sample.size      # True, 'jpg', 48213, (1024, 768)
    sample.reason                                              # for a skipped input: 'truncated image: ...'

Whatever the input (JPEG, PNG, TIFF, WebP, BMP, GIF; CMYK, grayscale, palette, 16-bit, with alpha; an EXIF
orientation tag), the output is an upright 8-bit RGB image, shrunk to `max_side` when asked, encoded as JPEG
(or PNG when lossless). Anything that does not decode completely (zero bytes, truncated, not an image, a
decompression bomb) comes back as a skip with a one-line reason instead of an exception, so one bad file never
stops a build. This module imports only PIL and numpy: it is what the spawned encode processes load.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
T = Image.Transpose
ORIENTATION_TRANSPOSE = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
                         6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int = 0        # 0 = keep the size
    quality: int = 90        # JPEG quality
    lossless: bool = False   # PNG instead of JPEG

    @property
    def ext(self) -> str:
        return "png" if self.lossless else "jpg"


@dataclass
class Encoded:
    """One encoded image, or the reason it was not written (`image` empty)."""

    image: bytes = b""
    ext: str = ""
    size: tuple[int, int] = (0, 0)   # (width, height) of the upright original, before any resize
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def _read_bytes(record) -> bytes:
    """The raw bytes of a record's file: a local path or any fsspec URL."""
    location = record.file or record.path
    if "://" in location:
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit (PIL's own convert clips at 255 instead of scaling)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
    elif img.mode.startswith("I;16") or (a.size and int(a.max()) > 255):
        a = a.astype(np.float64) / 257.0  # 65535 → 255
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparent pixels are composited on white, as a viewer would show them."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK (Adobe-inverted CMYK JPEGs are already fixed by the JPEG plugin), YCbCr, ...
    return img.convert("RGB")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright). Malformed EXIF is common in the wild and only costs the rotation."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
        return value if value in ORIENTATION_TRANSPOSE else 1
    except Exception:
        return 1


def load_image(data: bytes, max_side: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Decode fully, apply EXIF orientation, convert to RGB, shrink to max_side; (image, original size)."""
    img = Image.open(io.BytesIO(data))
    orientation = _orientation(img)
    w, h = img.size
    original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    target = _target_size(original, max_side)
    if img.format == "JPEG" and target != original:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (much faster); draft keeps at least the requested size.
        tw, th = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
        img.draft(None, (tw, th))
    img.load()  # decodes everything now: a truncated file fails here, not later in a training worker
    if orientation in ORIENTATION_TRANSPOSE:
        img = img.transpose(ORIENTATION_TRANSPOSE[orientation])
    img = to_rgb(img)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img, original


def encode_image(img: Image.Image, options: EncodeOptions) -> bytes:
    buf = io.BytesIO()
    if options.lossless:
        img.save(buf, "PNG", compress_level=6)
    else:
        # 4:2:0 subsampling is the JPEG norm; no EXIF or ICC is copied, so the bytes depend on pixels only.
        img.save(buf, "JPEG", quality=options.quality, subsampling=2, optimize=False)
    return buf.getvalue()


def decode_reason(e: BaseException) -> str:
    """A one-line reason an image did not decode (what the manifest's skipped list and predict's errors say)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, UnidentifiedImageError):
        return "not an image: cannot identify the image format"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large (decompression bomb guard): {text}"
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"truncated image: {text}"
    return f"corrupt image ({type(e).__name__}): {text}"


def encode_record(record, options: EncodeOptions) -> Encoded:
    """Read, decode and encode one record; never raises for bad input."""
    try:
        if record.pixels is not None:
            img = Image.fromarray(np.ascontiguousarray(record.pixels))
            original = img.size
            img = to_rgb(img)
            target = _target_size(original, options.max_side)
            if img.size != target:
                img = img.resize(target, Image.Resampling.BICUBIC)
        else:
            data = _read_bytes(record)
            if not data:
                return Encoded(reason="empty file (0 bytes)")
            with warnings.catch_warnings():
                # PIL warns on odd EXIF or large images; only the outcome counts
                warnings.simplefilter("ignore")
                img, original = load_image(data, options.max_side)
        return Encoded(image=encode_image(img, options), ext=options.ext, size=original)
    except MemoryError:
        raise
    except Exception as e:
        return Encoded(reason=decode_reason(e))


def encode_chunk(records: list, options: EncodeOptions) -> list[Encoded]:
    """The unit of work sent to a worker process: a few records at once amortise the pickling round trip."""
    return [encode_record(r, options) for r in records]
