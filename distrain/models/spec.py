"""The model's identity in one small dataclass, like timm's `pretrained_cfg`: what to build, and how inputs look.

Usage:
    from distrain.models.spec import ModelSpec
    spec = ModelSpec.from_config(cfg.model, classes=["cat", "dog"], image_size=cfg.data.image_size)
    model = create_model(spec)          # distrain.models.create_model; model.spec has the preprocessing filled in
    model.spec.preprocess               # {'image_size': 224, 'resize': 256, 'crop_pct': 0.875, 'mean': [...], ...}
    ModelSpec.from_dict(model.spec.to_dict()) == model.spec

The spec travels with the model: the training worker builds from it, checkpoints and the model/ folder store it
(`to_dict`), and eval, predict and export rebuild the model from it alone. It is serialized in exactly one place
(here), so the five places that used to rebuild "backbone, classes, head, depth, preprocessing" by hand cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a fine-tuned model (weights aside) and to feed it."""

    backbone: str                         # 'efficientnet_lite0', 'torchvision:vgg16', 'timm:convnext_tiny', ...
    classes: tuple[str, ...]              # index = label
    weights: str = "default"              # where the frozen part comes from (checkpoints omit it unless save_frozen)
    unfreeze_depth: int | str = "all"
    dropout: float = 0.2
    head_hidden: int = 0
    head_activation: str = "gelu"
    head_pool: str = "avg"
    vgg_top: str = "keep"
    image_size: int = 0                   # 0 until built: then the training/eval image side
    preprocess: dict[str, Any] = field(default_factory=dict)  # filled when built: see `preprocessing`

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_config(cls, model_cfg, classes: list[str], image_size: int = 0) -> ModelSpec:
        """The spec of a run: the config's model section, the shards' classes, data.image_size (0 = the backbone's)."""
        return cls(backbone=model_cfg.backbone, classes=tuple(classes), weights=model_cfg.weights,
                   unfreeze_depth=model_cfg.unfreeze_depth, dropout=model_cfg.dropout,
                   head_hidden=model_cfg.head_hidden, head_activation=model_cfg.head_activation,
                   head_pool=model_cfg.head_pool, vgg_top=model_cfg.vgg_top, image_size=int(image_size))

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["classes"] = tuple(values.get("classes") or ())
        return cls(**values)


def preprocessing(info, image_size: int) -> dict[str, Any]:
    """Evaluation preprocessing: resize the short side to image_size / crop_pct, center-crop image_size, normalize."""
    crop_pct = float(getattr(info, "crop_pct", 0.875))
    return {"image_size": int(image_size), "resize": round(image_size / crop_pct), "crop_pct": crop_pct,
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
            "interpolation": "bilinear", "input_size": int(info.input_size)}
