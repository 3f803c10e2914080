"""Which device a process computes on, and with which mixed precision: the one place that decides.

Usage:
    from distrain.device import pick_device, amp_settings
    device = pick_device("auto")                  # cuda when there is a GPU, else cpu
    dtype, use_scaler = amp_settings("auto", device)   # (torch.bfloat16, False) on bf16 GPUs; (None, False) on CPU

AMP runs only on GPUs: CPU autocast is slower than float32 for convnets (measured on this project's CPU recipe).
`auto` picks bf16 where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler.
"""

from __future__ import annotations

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler) for `train.amp` = auto | bf16 | fp16 | off on `device`."""
    if device.type != "cuda" or mode == "off":
        return None, False
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True
