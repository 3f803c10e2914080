"""Encoded image bytes → the augmented (size, size, 3) uint8 RGB crop a model sees (the CPU pipeline).

Usage:
    from distrain.data.transform import ImageTransform
    t = ImageTransform(size=224, strength=0.3, train=True)
    img = t(jpeg_bytes, "jpg", np.random.default_rng(0))    # (224, 224, 3) uint8 RGB
    d = t.draw_for(jpeg_bytes, "jpg", rng)                  # the same random draws, without decoding (GPU decode)

A JPEG's size comes from its header, so the sample's random draws (augment.draw) are made first and the crop box
tells libjpeg-turbo how far it may shrink the image while decoding (decode.py); ops.py then applies the rest of the
draws. Other formats decode in full first.
"""

from __future__ import annotations

import numpy as np

from distrain.data.augment import Affine, Draw, aug_params, center_box, draw
from distrain.data.decode import crop_resize, decode_crop, decode_full, jpeg_size
from distrain.data.ops import apply
from distrain.images import JPEG_KEYS


class ImageTransform:
    """Encoded bytes → augmented (size, size, 3) uint8 RGB, with all randomness from the caller's generator."""

    def __init__(self, size: int, strength: float = 0.0, train: bool = True, crop_pct: float = 0.875,
                 affine: Affine | None = None):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = size, crop_pct
        self.params = aug_params(strength if train else 0.0)
        self.affine = affine if train and affine is not None and affine.on else None

    @property
    def random(self) -> bool:
        return not self.params.center_crop or self.affine is not None

    def _draw(self, h: int, w: int, rng: np.random.Generator) -> Draw:
        return draw(h, w, self.size, self.params, rng, self.crop_pct, self.affine)

    def draw_for(self, data: bytes, ext: str, rng: np.random.Generator) -> Draw | None:
        """The sample's draws from its JPEG header alone (None when it is not a JPEG whose header parses)."""
        hw = jpeg_size(data) if ext in JPEG_KEYS else None
        return None if hw is None else self._draw(hw[0], hw[1], rng)

    def __call__(self, data: bytes, ext: str, rng: np.random.Generator) -> np.ndarray:
        hw = jpeg_size(data) if ext in JPEG_KEYS else None
        if hw is not None:
            d = self._draw(hw[0], hw[1], rng)
            img = decode_crop(data, ext, lambda h, w: d.box, self.size, fast=self.random)
        else:
            full = decode_full(data)
            d = self._draw(full.shape[0], full.shape[1], rng)
            img = crop_resize(full, full.shape[:2], d.box, self.size)
        return apply(img, d, self.affine.fill if self.affine else "nearest") if self.random else img

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
