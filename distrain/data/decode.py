"""Decode an encoded image straight to the crop the model needs: JPEGs at reduced size when the crop allows it.

Usage:
    from distrain.data.decode import decode_crop, DecodeError
    img = decode_crop(jpeg_bytes, "jpg", box=lambda h, w: (0, 0, h, w), size=224)   # (224, 224, 3) uint8 RGB

Why: decoding a 500 px JPEG in full to cut a 224 px crop out of it spends most of its time on pixels that are
thrown away. libjpeg-turbo can decode at n/8 scale by dropping DCT coefficients, so we read the header first,
let the caller choose the crop box in original coordinates, and ask simplejpeg for the smallest scale at which
that box is still at least `size` pixels on each side; OpenCV then crops and resizes (area filter when
shrinking). JPEGs simplejpeg cannot handle (CMYK, unusual markers) fall back to PIL's draft mode, other formats
(PNG, WebP, ...) go through OpenCV, then PIL. Anything that does not decode raises DecodeError, which the
pipeline counts and drops.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg

from distrain.images import JPEG_KEYS

# (top, left, height, width) of the crop in the image's original pixel coordinates, from its (height, width).
Box = tuple[float, float, float, float]


_threads_before_fork: list[int] = []


def _stop_pool_for_fork() -> None:
    _threads_before_fork.append(cv2.getNumThreads())
    cv2.setNumThreads(1)


def _restart_pool_after_fork() -> None:
    if _threads_before_fork:
        cv2.setNumThreads(_threads_before_fork.pop())


# OpenCV's pthreads pool does not survive fork: a child whose parent had live pool threads hangs forever in
# cv2.setNumThreads() (it joins threads that do not exist in the child), which loader workers call. So every
# os.fork() in a process that imported this module (DataLoader workers, test process groups) first stops the
# pool, and the parent restarts it right after; children start with a pool of one thread and no live threads.
os.register_at_fork(before=_stop_pool_for_fork, after_in_parent=_restart_pool_after_fork)


class DecodeError(Exception):
    """An image that does not decode (corrupt, truncated, not an image)."""


def single_threaded() -> None:
    """One decoding thread in this process (a loader worker, a Ray Data task): the processes are the parallelism,
    and nested thread pools only oversubscribe the cores."""
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # safe after fork: see _stop_pool_for_fork
    cv2.ocl.setUseOpenCL(False)


def _pil_decode(data: bytes, min_h: int = 0, min_w: int = 0) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and min_h and min_w:
            img.draft("RGB", (min_w, min_h))  # libjpeg scaling, keeps at least the requested size
        return np.asarray(img.convert("RGB"))
    except Exception as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def decode_full(data: bytes) -> np.ndarray:
    """Any image format in full, as (H, W, 3) uint8 RGB (OpenCV, else PIL); DecodeError when it does not decode."""
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # empty buffer and the like
        arr = None
    if arr is None:
        return _pil_decode(data)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG header, None when the header does not parse."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    except ValueError:
        return None


def dct_scale(box_h: float, box_w: float, size: int) -> int:
    """The largest d in 1, 2, 4, 8 such that decoding at 1/d keeps the box at least `size` pixels on each side.

    Only power-of-two scales: libjpeg-turbo's other n/8 scales measured slower than a full decode here.
    """
    d = 1
    while d < 8 and box_h / (2 * d) >= size and box_w / (2 * d) >= size:
        d *= 2
    return d


def decode_crop(data: bytes, ext: str, box: Callable[[int, int], Box], size: int, fast: bool = False
                ) -> np.ndarray:
    """Decode `data`, cut box(h, w) and resize it to size x size; (size, size, 3) uint8 RGB, C-contiguous.

    fast: libjpeg-turbo's fast DCT and chroma upsampling (~8 % faster, slightly less exact); for training.
    """
    hw = jpeg_size(data) if ext in JPEG_KEYS else None
    if hw is not None:
        h, w = hw
        top, left, bh, bw = box(h, w)
        d = dct_scale(bh, bw, size)
        min_h, min_w = math.ceil(h / d), math.ceil(w / d)
        try:
            img = simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast, min_height=min_h,
                                         min_width=min_w)
        except ValueError:
            img = _pil_decode(data, min_h, min_w)
        if img.ndim != 3 or img.shape[2] != 3:  # PIL fallback of odd modes
            raise DecodeError(f"unexpected decoded shape {img.shape}")
    else:
        img = decode_full(data)
        h, w = img.shape[:2]
        top, left, bh, bw = box(h, w)
    return crop_resize(img, (h, w), (top, left, bh, bw), size)


def crop_resize(img: np.ndarray, original_hw: tuple[int, int], box: Box, size: int) -> np.ndarray:
    """Cut `box` (in the coordinates of an image of `original_hw`; `img` may be that image decoded at reduced
    scale) and resize it to size x size: (size, size, 3) uint8, C-contiguous."""
    h, w = original_hw
    top, left, bh, bw = box
    fy, fx = img.shape[0] / h, img.shape[1] / w
    y0, x0 = round(top * fy), round(left * fx)
    y1 = max(y0 + 1, min(img.shape[0], round((top + bh) * fy)))
    x1 = max(x0 + 1, min(img.shape[1], round((left + bw) * fx)))
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    if ch == size and cw == size:
        return np.ascontiguousarray(crop)
    # Bilinear is exact enough below a 2x reduction (which DCT scaling leaves for JPEGs) and 5x faster than
    # OpenCV's area filter at non-integer ratios; larger reductions (big PNGs) need the area filter.
    area = ch >= 2 * size and cw >= 2 * size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)
