"""decode=gpu: a batch of JPEG bytes and their random draws → the model's normalized input, decoded on the device.

Usage:
    from distrain.data.gpu import GpuDecode
    prepare = GpuDecode(device, mean, std, size=224, channels_last=True)
    x = prepare(batch)            # float [B, 3, S, S] on the device; the same call shape as data.BatchToDevice

One batched nvJPEG call per batch (`torchcodec.decoders.decode_jpeg(..., device="cuda")` when TorchCodec is installed
— torchvision 0.29 marks its own GPU decoder deprecated in its favour — else `torchvision.io.decode_jpeg(list,
device=...)`), then everything the worker drew (augment.Draw) applied per sample on tensors: crop + antialiased
resize, flip, the data.affine warp, the RandAugment ops, color jitter, random erasing; then normalization,
channels_last and the dtype. Per-sample parameters, not one set per batch: torchvision's v2 transforms on a batched
tensor draw a single set for the whole batch (pytorch/vision#8484), so each op here takes one parameter per row.
Rows the worker decoded itself (non-JPEG samples) arrive as pixels and join the batch unchanged.

The same code runs with the CPU as the device (torchvision's CPU decoder), which is how it is tested without a GPU:
at strength 0 its output matches the CPU pipeline's within a few levels of 255 (different resize filters), and the
random draws are identical by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distrain.data.augment import FILL, Draw

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as the CPU ops


def resolve_decode(choice: str, device) -> str:
    """data.decode for a worker's device: `auto` is gpu on CUDA (the workers then only read and draw, so the CPU
    cores a node has per GPU stop being the limit) and cpu elsewhere; `gpu` without CUDA is an error."""
    cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "gpu" if cuda else "cpu"
    if choice == "gpu" and not cuda:
        raise ValueError(f"data.decode=gpu needs a CUDA device, and this worker has {device}: use data.decode=auto "
                         "or cpu")
    return choice


def create_prepare(cfg_data, device, mean, std, size: int, decode: str):
    """The batch → model input step for a resolved `decode`: BatchToDevice (cpu) or GpuDecode (gpu)."""
    from distrain.data.device import BatchToDevice

    if decode == "gpu":
        return GpuDecode(device, mean, std, size, channels_last=cfg_data.channels_last,
                         affine_fill=cfg_data.affine.fill)
    return BatchToDevice(device, mean, std, channels_last=cfg_data.channels_last)


def _decoder():
    """The batched JPEG decoder: TorchCodec's when installed, else torchvision's."""
    try:
        from torchcodec.decoders import decode_jpeg  # type: ignore[import-not-found]

        return decode_jpeg
    except ImportError:
        from torchvision.io import decode_jpeg

        return decode_jpeg


def decode_batch(encoded: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes → uint8 [3, H, W] tensors on `device` (RGB), one batched call."""
    import warnings

    from torchvision.io import ImageReadMode

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for its GPU decoder
        out = _decoder()(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


def _crop_resize(img: torch.Tensor, box, size: int) -> torch.Tensor:
    """uint8 [3, H, W] → float [3, size, size]: the box (top, left, height, width) cut out and resized with an
    antialiased bilinear filter (what decode.crop_resize does with OpenCV on the CPU)."""
    h, w = img.shape[-2:]
    top, left, bh, bw = box
    y0, x0 = round(top), round(left)
    y1 = max(y0 + 1, min(h, round(top + bh)))
    x1 = max(x0 + 1, min(w, round(left + bw)))
    crop = img[:, y0:y1, x0:x1].float().unsqueeze(0)
    if crop.shape[-2:] == (size, size):
        return crop[0]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _pixel_affine(x: torch.Tensor, rows: list[int], mats: list, fill: str) -> torch.Tensor:
    """Warp rows of float [B, 3, S, S] by 2x3 matrices that map output pixels to input pixels (OpenCV's inverse
    map convention); `fill`: nearest (replicate the edge) or constant (FILL)."""
    if not rows:
        return x
    n, s = len(rows), x.shape[-1]
    m = torch.tensor([[list(r) for r in mat] for mat in mats], dtype=torch.float32, device=x.device)  # [n,2,3]
    # pixel → normalized coordinates (align_corners=True: -1 and 1 are the centres of the edge pixels)
    to_norm = torch.tensor([[2 / (s - 1), 0, -1], [0, 2 / (s - 1), -1], [0, 0, 1]], device=x.device)
    from_norm = torch.linalg.inv(to_norm)
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], device=x.device).expand(n, 1, 3)], 1)
    theta = (to_norm @ full @ from_norm)[:, :2]
    grid = F.affine_grid(theta, [n, 3, s, s], align_corners=True)
    idx = torch.tensor(rows, device=x.device)
    src = x.index_select(0, idx)
    if fill == "nearest":
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    else:
        ones = torch.ones_like(src[:, :1])
        out = F.grid_sample(torch.cat([src, ones], 1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        inside = out[:, 3:]
        fill_t = torch.tensor(FILL, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out = out[:, :3] + (1 - inside) * fill_t
    x = x.clone()
    x[idx] = out
    return x


def _op_matrix(name: str, value: float, s: int):
    """The 2x3 output → input pixel map of a geometric RandAugment op (the inverse of ops.py's forward warps)."""
    import numpy as np

    c = s / 2
    if name == "Rotate":
        a = math.radians(value)  # OpenCV rotates counter-clockwise by `value` degrees about the centre
        fwd = np.array([[math.cos(a), math.sin(a), (1 - math.cos(a)) * c - math.sin(a) * c],
                        [-math.sin(a), math.cos(a), math.sin(a) * c + (1 - math.cos(a)) * c]])
    elif name == "ShearX":
        fwd = np.array([[1, value, -value * c], [0, 1, 0]])
    elif name == "ShearY":
        fwd = np.array([[1, 0, 0], [value, 1, -value * c]])
    elif name == "TranslateX":
        fwd = np.array([[1, 0, value * s], [0, 1, 0]])
    else:  # TranslateY
        fwd = np.array([[1, 0, 0], [0, 1, value * s]])
    full = np.vstack([fwd, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


def _color(x: torch.Tensor, brightness, contrast, saturation) -> torch.Tensor:
    """PIL's Brightness, Contrast and Color enhancers in that order, per row (factor tensors [n, 1, 1, 1])."""
    gray_w = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * gray_w).sum(1, keepdim=True)
    x = gray + saturation * (x - gray)                       # saturation: blend with the gray image
    mean = (gray.mean((2, 3), keepdim=True))
    x = (x * contrast + (1 - contrast) * mean) * brightness  # contrast about the mean gray level, then brightness
    return x.clamp_(0, 255)


def _apply_op(x: torch.Tensor, name: str, values: torch.Tensor) -> torch.Tensor:
    """One non-geometric RandAugment op on rows x (float [n, 3, S, S], 0..255), one value per row."""
    v = values.view(-1, 1, 1, 1)
    if name == "Identity":
        return x
    if name == "Solarize":
        return torch.where(x < v, x, 255 - x)
    if name == "Posterize":
        shift = (8 - v).to(torch.int32)
        q = x.round().to(torch.int32)
        return ((q >> shift) << shift).to(x.dtype)
    if name == "AutoContrast":
        lo = x.amin((2, 3), keepdim=True)
        hi = x.amax((2, 3), keepdim=True)
        scale = torch.where(hi > lo, 255 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x).clamp_(0, 255)
    if name == "Equalize":
        return _equalize(x)
    ones = torch.ones_like(v)
    if name == "Color":
        return _color(x, ones, ones, v)
    if name == "Contrast":
        return _color(x, ones, v, ones)
    if name == "Brightness":
        return _color(x, v, ones, ones)
    if name == "Sharpness":
        k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k.expand(3, 1, 3, 3), groups=3)
        return (smooth + v * (x - smooth)).clamp_(0, 255)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of every channel of every row (as cv2.equalizeHist per channel)."""
    n, c, h, w = x.shape
    q = x.round().clamp(0, 255).to(torch.int64).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.int64).scatter_add_(1, q, torch.ones_like(q))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, h * w)).amin(1, keepdim=True)
    denom = (h * w - cdf_min).clamp_min(1)
    lut = ((cdf - cdf_min).clamp_min(0).double() * 255 / denom).round().clamp(0, 255).to(x.dtype)
    return lut.gather(1, q).view(n, c, h, w)


class GpuDecode:
    """A decode=gpu batch → normalized float [B, 3, S, S] on `device` (see the module docstring)."""

    def __init__(self, device, mean, std, size: int, channels_last: bool = True, dtype: torch.dtype = torch.float32,
                 affine_fill: str = "nearest"):
        self.device, self.size, self.channels_last, self.dtype = torch.device(device), size, channels_last, dtype
        self.affine_fill = affine_fill
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        if float(m.max()) > 1.0:
            m, s = m / 255, s / 255
        self.scale = (1 / (255 * s)).to(self.device)
        self.shift = (m / s).to(self.device)
        self._last: torch.Tensor | None = None

    def pixels(self, batch) -> torch.Tensor:
        """The batch's augmented images as float [B, 3, S, S] in 0..255 on the device (before normalization)."""
        B, S = len(batch.keys), self.size
        encoded = batch.encoded or [None] * B
        jpeg_rows = [i for i, e in enumerate(encoded) if e is not None]
        if not jpeg_rows:
            x = batch.images.to(self.device, non_blocking=True).float()
        else:  # copy only the rows the workers decoded (other formats, padding): the rest are decoded here
            x = torch.zeros((B, 3, S, S), device=self.device)
            cpu_rows = [i for i, e in enumerate(encoded) if e is None]
            if cpu_rows:
                idx = torch.tensor(cpu_rows)
                x[idx.to(self.device)] = batch.images.index_select(0, idx).to(self.device, non_blocking=True).float()
            decoded = decode_batch([encoded[i] for i in jpeg_rows], self.device)
            for i, img in zip(jpeg_rows, decoded):
                x[i] = _crop_resize(img, batch.draws[i].box, S)
        draws, jpeg = batch.draws or [None] * B, set(jpeg_rows)
        return self._augment(x, [draws[i] if i in jpeg else None for i in range(B)])

    def _augment(self, x: torch.Tensor, draws: list[Draw | None]) -> torch.Tensor:
        rows = [i for i, d in enumerate(draws) if d is not None]
        if not rows:
            return x
        flips = [i for i in rows if draws[i].flip]
        if flips:
            idx = torch.tensor(flips, device=x.device)
            x = x.clone()
            x[idx] = x[idx].flip(-1)
        warped = [i for i in rows if draws[i].affine is not None]
        x = _pixel_affine(x, warped, [draws[i].affine for i in warped], self.affine_fill)
        slots = max((len(draws[i].ops) for i in rows), default=0)
        for k in range(slots):  # ops apply in order per row; rows with the same op in a slot go together
            by_name: dict[str, list[int]] = {}
            for i in rows:
                if k < len(draws[i].ops):
                    by_name.setdefault(draws[i].ops[k][0], []).append(i)
            for name, members in by_name.items():
                values = [draws[i].ops[k][1] for i in members]
                if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
                    x = _pixel_affine(x, members, [_op_matrix(name, v, self.size) for v in values], "constant")
                    continue
                idx = torch.tensor(members, device=x.device)
                out = _apply_op(x.index_select(0, idx), name, torch.tensor(values, device=x.device))
                x = x.clone()
                x[idx] = out
        jit = [i for i in rows if draws[i].jitter is not None]
        if jit:
            idx = torch.tensor(jit, device=x.device)
            f = torch.tensor([draws[i].jitter for i in jit], device=x.device, dtype=x.dtype)
            out = _color(x.index_select(0, idx), f[:, 0].view(-1, 1, 1, 1), f[:, 1].view(-1, 1, 1, 1),
                         f[:, 2].view(-1, 1, 1, 1))
            x = x.clone()
            x[idx] = out
        erased = [i for i in rows if draws[i].erase is not None]
        if erased:
            x = x.clone()
            gen = torch.Generator(device=x.device).manual_seed(int(draws[erased[0]].erase[4]))
            for i in erased:
                y0, x0, eh, ew, _ = draws[i].erase
                x[i, :, y0:y0 + eh, x0:x0 + ew] = torch.randint(0, 256, (3, eh, ew), generator=gen,
                                                                device=x.device).to(x.dtype)
        return x

    def __call__(self, batch) -> torch.Tensor:
        x = self.pixels(batch).round_().clamp_(0, 255)
        self._last = x.to(torch.uint8)  # kept for images(): cheap next to the decode
        x = x.mul_(self.scale).sub_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    def images(self, batch) -> torch.Tensor:
        """The last prepared batch's uint8 images [B, 3, S, S] on the CPU (tables of misclassified images)."""
        if self._last is None:
            return batch.images
        return self._last.cpu()
