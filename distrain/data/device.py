"""On the device: uint8 batches become normalized float tensors there, and Mixup/CutMix mix them there.

Usage:
    from distrain.data import to_device, BatchToDevice, Mixup
    x = to_device(batch.images, device, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    prepare = BatchToDevice(device, mean, std, channels_last=True)
    x = prepare(batch)                                 # the same, for a loader Batch
    mix = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=10, seed=rank)
    x, targets = mix(x, batch.labels.to(device))      # targets: float [B, num_classes], rows sum to 1
    loss = torch.nn.functional.cross_entropy(model(x), targets)

Why: a uint8 batch is a quarter of the bytes of a float one, so host-to-device copies stay small; the
normalization is one fused multiply-subtract on the device. Batches arrive in channels_last memory (NHWC, how the
workers write them), which is what convolutions on GPUs prefer; `channels_last=False` gives NCHW-contiguous.
Mixup/CutMix follow timm's batch mode: one lambda per batch, the batch mixed with its reverse.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    if m.numel() != 3 or s.numel() != 3 or bool((s <= 0).any()):
        raise ValueError(f"mean and std need 3 values each (std > 0), got {mean} and {std}")
    if float(m.max()) > 1.0:  # given on the 0..255 scale
        m, s = m / 255, s / 255
    scale = (1.0 / (255.0 * s)).to(dtype).view(1, 3, 1, 1).to(device)
    shift = (m / s).to(dtype).view(1, 3, 1, 1).to(device)
    return scale, shift


def to_device(images: torch.Tensor, device: torch.device | str, mean=(0.485, 0.456, 0.406),
              std=(0.229, 0.224, 0.225), channels_last: bool = True, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """uint8 [B, 3, H, W] → (x / 255 - mean) / std as `dtype` on `device` (mean/std on the 0..1 scale)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    device = torch.device(device)
    x = images.to(device, non_blocking=True)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale, shift = _affine(tuple(float(v) for v in mean), tuple(float(v) for v in std), str(device), dtype)
    return x.to(dtype).mul_(scale).sub_(shift)


class BatchToDevice:
    """A loader Batch → the model's normalized input on the device (what the training step and validation call)."""

    def __init__(self, device, mean, std, channels_last: bool = True, dtype: torch.dtype = torch.float32):
        self.device, self.mean, self.std = torch.device(device), tuple(mean), tuple(std)
        self.channels_last, self.dtype = channels_last, dtype

    def __call__(self, batch) -> torch.Tensor:
        return to_device(batch.images, self.device, self.mean, self.std, self.channels_last, self.dtype)

    def images(self, batch) -> torch.Tensor:
        """The batch's uint8 images [B, 3, H, W] on the CPU (for tables of misclassified images)."""
        return batch.images


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


class Mixup:
    """Batch-wise Mixup / CutMix on the device; a no-op mixing (hard one-hot targets) when both alphas are 0."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, num_classes: int = 1000,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.0, seed: int = 0):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes
        self.switch_prob, self.prob, self.label_smoothing = switch_prob, prob, label_smoothing
        self.rng = np.random.default_rng(seed % (1 << 63))

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def _choose(self) -> tuple[float, bool]:
        """(lambda, use_cutmix) for this batch."""
        if not self.enabled or self.rng.random() >= self.prob:
            return 1.0, False
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), cutmix

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = one_hot(labels, self.num_classes, self.label_smoothing).to(x.device)
        lam, cutmix = self._choose()
        if lam >= 1.0:
            return x, targets
        if cutmix:
            H, W = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(self.rng.integers(H)), int(self.rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
