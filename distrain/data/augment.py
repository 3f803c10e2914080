"""One knob for augmentation, and every random draw of a sample's augmentation, made before any pixel is touched.

Usage:
    from distrain.data.augment import aug_params, aug_table, draw, Affine
    aug_params(0.3).crop_scale                              # (0.724, 1.0)
    d = draw(h=480, w=640, size=224, params=aug_params(0.3), rng=np.random.default_rng(0))
    d.box, d.flip, d.ops, d.jitter, d.erase                 # the crop box in original pixels, ... (a Draw)
    print(aug_table())                                      # the README's table

The mapping of `data.aug_strength` (s; 0 is exactly the evaluation transform, deterministic):
    crop       s = 0: resize + center crop (crop_pct of the shorter side); s > 0: RandomResizedCrop with
               area scale (1 - 0.92 s, 1) and aspect ratio (3/4, 4/3), horizontal flip p = 0.5
    RandAugment 2 ops drawn from the standard 14, each applied with p = min(0.5, s), magnitude 10 s (of 10)
    jitter     brightness, contrast and saturation factors uniform in [1 - 0.4 s, 1 + 0.4 s]
    erasing    p = 0.25 s, area 2–33 %, filled with random pixels
`data.affine` adds an always-on Keras-style affine (rotation, shift, shear, zoom) after the crop. Mixup and CutMix
are separate switches (`data.mixup`, `data.cutmix`, applied on the device; see device.py).

Why draws first: the same Draw is applied to uint8 arrays by the CPU pipeline (ops.py, after decoding the JPEG at
reduced scale) and to GPU tensors by the GPU pipeline (gpu.py, after nvJPEG), so `data.decode=cpu` and `gpu` make
the same random choices from the same seed; only the pixel arithmetic differs. The ops follow timm's RandAugment
definitions (magnitude 10 = rotate 30°, shear 0.3, translate 45 %, enhance factors 1 ± 0.9, posterize to 4 bits,
solarize from 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distrain.data.decode import Box

FILL = (124, 116, 104)  # ImageNet mean in uint8: what geometric ops show where the image moved away

RAND_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
                    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Brightness",
              "Sharpness")


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


@dataclass(frozen=True)
class Affine:
    """The always-on affine of `data.affine` (Keras ImageDataGenerator semantics): ranges, and how to fill."""

    rotation: float = 0.0     # degrees: uniform(-r, r)
    shift: float = 0.0        # fraction of the side, each axis: uniform(-s, s)
    shear: float = 0.0        # degrees, as Keras' shear_range: uniform(-s, s)
    zoom: float = 0.0         # each axis scales by uniform(1 - z, 1 + z)
    fill: str = "nearest"     # nearest (replicate the edge) or constant (FILL)

    @property
    def on(self) -> bool:
        return bool(self.rotation or self.shift or self.shear or self.zoom)

    @classmethod
    def from_config(cls, affine_cfg) -> Affine:
        return cls(affine_cfg.rotation, affine_cfg.shift, affine_cfg.shear, affine_cfg.zoom, affine_cfg.fill)


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


# ------------------------------------------------------------------------------------------------ the draws


@dataclass
class Draw:
    """Everything random about one sample's augmentation (a center crop and nothing else at strength 0)."""

    box: Box                                         # (top, left, height, width) in original pixels
    flip: bool = False
    affine: np.ndarray | None = None                 # 2x3, output pixels → input pixels of the size x size crop
    ops: list[tuple[str, float]] = field(default_factory=list)   # RandAugment ops applied, with their value
    jitter: tuple[float, float, float] | None = None  # brightness, contrast, saturation factors
    erase: tuple[int, int, int, int, int] | None = None  # top, left, height, width, fill seed


def op_value(name: str, magnitude: float, rng: np.random.Generator) -> float:
    """The parameter an op applies at `magnitude` (0..10), with timm's ranges and a random sign where it has one."""
    level = magnitude / 10.0
    sign = (1.0 if rng.random() < 0.5 else -1.0) if name in SIGNED_OPS else 1.0
    if name == "Rotate":
        return sign * 30 * level                     # degrees
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * level
    if name in ("TranslateX", "TranslateY"):
        return sign * 0.45 * level                   # fraction of the side
    if name == "Solarize":
        return 256 - 256 * level                     # threshold
    if name == "Posterize":
        return float(8 - round(4 * level))           # bits kept
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 1.0 + sign * 0.9 * level              # enhance factor
    return 0.0                                       # Identity, AutoContrast, Equalize


def affine_matrix(a: Affine, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Keras' random transform (rotation, shift, shear, zoom about the center) as a 2x3 output → input map."""
    if not a.on:
        return None
    theta = math.radians(rng.uniform(-a.rotation, a.rotation)) if a.rotation else 0.0
    tx, ty = (rng.uniform(-a.shift, a.shift, 2) * size) if a.shift else (0.0, 0.0)
    shear = math.radians(rng.uniform(-a.shear, a.shear)) if a.shear else 0.0
    zx, zy = rng.uniform(1 - a.zoom, 1 + a.zoom, 2) if a.zoom else (1.0, 1.0)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shr = np.array([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
    m = rot @ shr @ np.diag([zx, zy])
    c = (size - 1) / 2
    offset = np.array([c, c]) - m @ np.array([c, c]) + np.array([tx, ty])
    return np.hstack([m, offset[:, None]]).astype(np.float32)


def draw(h: int, w: int, size: int, params: AugParams, rng: np.random.Generator, crop_pct: float = 0.875,
         affine: Affine | None = None) -> Draw:
    """All of one sample's random choices, in a fixed order of the generator (CPU and GPU pipelines share it)."""
    if params.center_crop:
        d = Draw(center_box(h, w, crop_pct))
        if affine is not None and affine.on:
            d.affine = affine_matrix(affine, size, rng)
        return d
    d = Draw(random_resized_box(h, w, params.crop_scale, params.crop_ratio, rng))
    d.flip = bool(rng.random() < params.hflip)
    if affine is not None and affine.on:
        d.affine = affine_matrix(affine, size, rng)
    for _ in range(params.randaug_ops):
        name = RAND_AUGMENT_OPS[int(rng.integers(len(RAND_AUGMENT_OPS)))]
        if rng.random() < params.randaug_prob:
            d.ops.append((name, op_value(name, params.randaug_magnitude, rng)))
    if params.color_jitter > 0:
        j = params.color_jitter
        d.jitter = tuple(float(v) for v in rng.uniform(1 - j, 1 + j, size=3))
    if rng.random() < params.erase_prob:
        d.erase = erase_box(size, rng)
    return d


def erase_box(size: int, rng: np.random.Generator, area=(0.02, 1 / 3), log_ratio=(-1.204, 1.194)):
    """timm's RandomErasing region on a size x size image, and a seed for its random fill; None if none fits."""
    for _ in range(10):
        target = size * size * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if eh < size and ew < size:
            y, x = int(rng.integers(0, size - eh + 1)), int(rng.integers(0, size - ew + 1))
            return y, x, eh, ew, int(rng.integers(1 << 31))
    return None
