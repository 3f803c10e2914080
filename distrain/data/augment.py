"""One knob for augmentation: `data.aug_strength` in [0, 1] sets crop scale, RandAugment, color jitter and erasing.

Usage:
    from distrain.data.augment import ImageTransform, aug_params, aug_table
    t = ImageTransform(size=224, strength=0.3, train=True)
    img = t(jpeg_bytes, "jpg", np.random.default_rng(0))    # (224, 224, 3) uint8 RGB
    aug_params(0.3).crop_scale                              # (0.724, 1.0)
    print(aug_table())                                      # the README's table

The mapping (s = strength; 0 is exactly the evaluation transform, deterministic):
    crop       s = 0: resize + center crop (crop_pct of the shorter side); s > 0: RandomResizedCrop with
               area scale (1 - 0.92 s, 1) and aspect ratio (3/4, 4/3), horizontal flip p = 0.5
    RandAugment 2 ops drawn from the standard 14, each applied with p = min(0.5, s), magnitude 10 s (of 10)
    jitter     brightness, contrast and saturation factors uniform in [1 - 0.4 s, 1 + 0.4 s]
    erasing    p = 0.25 s, area 2–33 %, filled with random pixels
Mixup and CutMix are separate switches (`data.mixup`, `data.cutmix`, applied on the device; see device.py).

Every op works on uint8 HWC arrays with OpenCV lookup tables and warps (tens of microseconds each at 224 px),
not on PIL images or float tensors: augmentation must not undo the speed won by decoding at reduced size.
The ops follow timm's RandAugment definitions (magnitude 10 = rotate 30°, shear 0.3, translate 45 %, enhance
factors 1 ± 0.9, posterize to 4 bits, solarize from 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from distrain.data.decode import Box, crop_resize, decode_crop

FILL = (124, 116, 104)  # ImageNet mean in uint8: what geometric ops show where the image moved away


@dataclass(frozen=True)
class AugParams:
    """What one strength value means; `aug_params(s)` is the single source of the mapping."""

    strength: float
    crop_scale: tuple[float, float]   # RandomResizedCrop area range; (1, 1) with ratio (1, 1) = center crop
    crop_ratio: tuple[float, float]
    hflip: float                      # probability
    randaug_ops: int
    randaug_prob: float               # probability of applying each drawn op
    randaug_magnitude: float          # 0..10
    color_jitter: float               # brightness/contrast/saturation factors in [1 - j, 1 + j]
    erase_prob: float

    @property
    def center_crop(self) -> bool:
        return self.strength == 0


def aug_params(strength: float) -> AugParams:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"data.aug_strength must be in [0, 1], got {strength}")
    if s == 0:
        return AugParams(0.0, (1.0, 1.0), (1.0, 1.0), 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    return AugParams(s, (round(1 - 0.92 * s, 4), 1.0), (3 / 4, 4 / 3), 0.5, 2, round(min(0.5, s), 4),
                     round(10 * s, 3), round(0.4 * s, 4), round(0.25 * s, 4))


def aug_table(strengths: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)) -> str:
    """The strength mapping as a Markdown table (generated into the README; a test keeps them equal)."""
    rows = ["| strength | crop | h-flip | RandAugment | color jitter | random erasing |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in strengths:
        p = aug_params(s)
        if p.center_crop:
            rows.append(f"| {s:g} | resize + center crop | – | – | – | – |")
            continue
        rows.append(f"| {s:g} | RandomResizedCrop, scale {p.crop_scale[0]:.2f}–1, ratio 3/4–4/3 | p {p.hflip:g} "
                    f"| {p.randaug_ops} ops, p {p.randaug_prob:g}, magnitude {p.randaug_magnitude:g}/10 "
                    f"| ±{p.color_jitter:g} | p {p.erase_prob:g} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ crop boxes


def center_box(h: int, w: int, crop_pct: float) -> Box:
    """Resize-shorter-side-to size/crop_pct then center-crop size, expressed as a box in original pixels."""
    side = min(h, w) * crop_pct
    return (h - side) / 2, (w - side) / 2, side, side


def random_resized_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop.get_params, on our generator."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


# ----------------------------------------------------------------------------------------------- pixel ops


GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL's convert("L")


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, np.clip(table, 0, 255).astype(np.uint8))


def color_affine(img: np.ndarray, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0
                 ) -> np.ndarray:
    """PIL's Brightness, Contrast and Color enhancers in that order, fused into one 3x4 colour matrix.

    Each enhancer blends with a degenerate image (black, the mean gray level, the gray image); all three are
    affine in the pixel values, so one cv2.transform (~30 us at 224 px) replaces three passes. The only
    difference from applying them one by one is that intermediate values are not clipped to 0..255.
    """
    cb = contrast * brightness
    matrix = cb * (saturation * np.eye(3, dtype=np.float32) + (1 - saturation) * np.outer(np.ones(3), GRAY))
    offset = 0.0
    if contrast != 1.0:
        offset = (1 - contrast) * brightness * float(np.dot(cv2.mean(img)[:3], GRAY))
    m = np.hstack([matrix, np.full((3, 1), offset)]).astype(np.float32)
    return cv2.transform(img, m)


def _blend(img: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance semantics: other + factor * (img - other), saturated to uint8."""
    return cv2.addWeighted(img, factor, other, 1.0 - factor, 0.0)


def sharpness(img, f):
    smooth = cv2.filter2D(img, -1, np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13)
    return _blend(img, smooth, f)


def autocontrast(img, _=None):
    """Stretch each channel to 0..255 (PIL's ImageOps.autocontrast without cutoff)."""
    x = np.arange(256, dtype=np.float32)
    tables = []
    for channel in cv2.split(img):
        lo, hi, _, _ = cv2.minMaxLoc(channel)
        tables.append(np.clip((x - lo) * 255 / (hi - lo), 0, 255) if hi > lo else x)
    return cv2.LUT(img, np.stack(tables, 1).astype(np.uint8).reshape(256, 1, 3))


def equalize(img, _=None):
    return cv2.merge([cv2.equalizeHist(c) for c in cv2.split(img)])


def solarize(img, threshold):
    x = np.arange(256)
    return _lut(img, np.where(x < threshold, x, 255 - x))


def posterize(img, bits):
    mask = (0xFF << (8 - int(bits))) & 0xFF
    return _lut(img, np.arange(256) & mask)


def affine(img, matrix):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=FILL)


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


def rand_augment_op(img: np.ndarray, name: str, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """One RandAugment op at `magnitude` (0..10), with timm's ranges."""
    level = magnitude / 10.0
    h, w = img.shape[:2]
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return autocontrast(img)
    if name == "Equalize":
        return equalize(img)
    if name == "Rotate":
        return affine(img, cv2.getRotationMatrix2D((w / 2, h / 2), _signed(30 * level, rng), 1.0))
    if name == "ShearX":
        s = _signed(0.3 * level, rng)
        return affine(img, np.float32([[1, s, -s * h / 2], [0, 1, 0]]))
    if name == "ShearY":
        s = _signed(0.3 * level, rng)
        return affine(img, np.float32([[1, 0, 0], [s, 1, -s * w / 2]]))
    if name == "TranslateX":
        return affine(img, np.float32([[1, 0, _signed(0.45 * level, rng) * w], [0, 1, 0]]))
    if name == "TranslateY":
        return affine(img, np.float32([[1, 0, 0], [0, 1, _signed(0.45 * level, rng) * h]]))
    if name == "Solarize":
        return solarize(img, 256 - 256 * level)
    if name == "Posterize":
        return posterize(img, 8 - round(4 * level))
    factor = 1.0 + _signed(0.9 * level, rng)
    if name == "Color":
        return color_affine(img, saturation=factor)
    if name == "Contrast":
        return color_affine(img, contrast=factor)
    if name == "Brightness":
        return color_affine(img, brightness=factor)
    if name == "Sharpness":
        return sharpness(img, factor)
    raise ValueError(f"unknown RandAugment op {name!r}")


RAND_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
                    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")


def color_jitter(img: np.ndarray, j: float, rng: np.random.Generator) -> np.ndarray:
    b, c, s = rng.uniform(1 - j, 1 + j, size=3)
    return color_affine(img, b, c, s)


def random_erase(img: np.ndarray, rng: np.random.Generator, area=(0.02, 1 / 3), log_ratio=(-1.204, 1.194)):
    """timm's RandomErasing (per-pixel random fill) on a uint8 image, in place."""
    h, w = img.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if eh < h and ew < w:
            y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            img[y:y + eh, x:x + ew] = rng.integers(0, 256, (eh, ew, 3), dtype=np.uint8)
            return img
    return img


# ------------------------------------------------------------------------------------------- the transform


class ImageTransform:
    """Encoded bytes → augmented (size, size, 3) uint8 RGB, with all randomness from the caller's generator."""

    def __init__(self, size: int, strength: float = 0.0, train: bool = True, crop_pct: float = 0.875):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = size, crop_pct
        self.params = aug_params(strength if train else 0.0)

    def __call__(self, data: bytes, ext: str, rng: np.random.Generator) -> np.ndarray:
        p = self.params
        if p.center_crop:
            return decode_crop(data, ext, lambda h, w: center_box(h, w, self.crop_pct), self.size)
        img = decode_crop(data, ext, lambda h, w: random_resized_box(h, w, p.crop_scale, p.crop_ratio, rng),
                          self.size, fast=True)
        if rng.random() < p.hflip:
            img = cv2.flip(img, 1)
        for _ in range(p.randaug_ops):
            op = RAND_AUGMENT_OPS[int(rng.integers(len(RAND_AUGMENT_OPS)))]
            if rng.random() < p.randaug_prob:
                img = rand_augment_op(img, op, p.randaug_magnitude, rng)
        if p.color_jitter > 0:
            img = color_jitter(img, p.color_jitter, rng)
        if rng.random() < p.erase_prob:
            img = random_erase(np.ascontiguousarray(img), rng)
        return img

    def center(self, img: np.ndarray) -> np.ndarray:
        """The evaluation crop of an already decoded (H, W, 3) uint8 RGB image (predict decodes files itself)."""
        h, w = img.shape[:2]
        return crop_resize(img, (h, w), center_box(h, w, self.crop_pct), self.size)

    def torchvision_equivalent(self):
        """The same mapping with torchvision transforms on PIL images (the benchmark's ImageFolder baseline)."""
        from torchvision.transforms import v2

        p, size = self.params, self.size
        if p.center_crop:
            return v2.Compose([v2.Resize(round(size / self.crop_pct)), v2.CenterCrop(size), v2.PILToTensor()])
        # torchvision's RandAugment applies every drawn op; its magnitude bins 0..30 are timm's 0..10 times 3.
        randaug = v2.RandomApply([v2.RandAugment(num_ops=1, magnitude=round(3 * p.randaug_magnitude))],
                                 p=p.randaug_prob)
        ops = [v2.RandomResizedCrop(size, scale=p.crop_scale, ratio=p.crop_ratio), v2.RandomHorizontalFlip(p.hflip)]
        ops += [randaug] * p.randaug_ops
        if p.color_jitter > 0:
            ops.append(v2.ColorJitter(p.color_jitter, p.color_jitter, p.color_jitter))
        ops += [v2.PILToTensor(), v2.RandomErasing(p.erase_prob, value=0)]
        return v2.Compose(ops)
