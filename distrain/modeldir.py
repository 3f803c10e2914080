"""The self-contained `model/` folder a training run leaves, and loading it back.

Usage:
    from distrain.modeldir import load_model_dir
    m = load_model_dir("outputs/fashion_mnist/model")      # local path or fsspec URL
    m.model.eval(); m.classes; m.preprocess                # {'image_size', 'resize', 'mean', 'std', ...}

Layout (format `distrain-model/1`):
    model/config.json          backbone, classes, head, preprocessing, where it came from (run, epoch, val top-1)
    model/weights.safetensors  the whole state dict (frozen backbone included, so nothing else is needed)
    model/classes.txt          one class name per line, index = line number
`eval`, `predict` and `export` read only this folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "distrain-model/1"
REQUIRED = ("config.json", "weights.safetensors")


class ModelDirError(ValueError):
    """A model folder that cannot be loaded, naming what is wrong or missing."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    classes: list[str]
    preprocess: dict[str, Any]
    meta: dict[str, Any]


def preprocessing(info, image_size: int) -> dict[str, Any]:
    """Evaluation preprocessing: resize the short side to image_size / crop_pct, center-crop image_size."""
    crop_pct = 0.875
    return {"image_size": int(image_size), "resize": round(image_size / crop_pct), "crop_pct": crop_pct,
            "mean": list(info.mean), "std": list(info.std), "interpolation": "bilinear"}


def save_model_dir(model: torch.nn.Module, folder: str, *, classes: list[str], model_cfg: dict[str, Any],
                   image_size: int, provenance: dict[str, Any] | None = None) -> str:
    """Write model/ (locally, or to any fsspec URL through a local temp folder)."""
    from dataclasses import asdict

    import fsspec
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "backbone": model_cfg["backbone"], "num_classes": len(classes), "classes": classes,
            "head_hidden": model_cfg.get("head_hidden", 0), "dropout": model_cfg.get("dropout", 0.0),
            "info": asdict(model.info), "preprocess": preprocessing(model.info, image_size),
            "provenance": provenance or {}}
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / "weights.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        (Path(tmp) / "classes.txt").write_text("\n".join(classes) + "\n")
        fs, path = fsspec.core.url_to_fs(folder)
        fs.makedirs(path, exist_ok=True)
        for name in ("weights.safetensors", "config.json", "classes.txt"):
            fs.put_file(str(Path(tmp) / name), f"{path.rstrip('/')}/{name}")
    return folder


def load_model_dir(folder: str, device: str | torch.device = "cpu") -> LoadedModel:
    import fsspec
    from safetensors.torch import load as load_safetensors

    from distrain.models import create_model

    fs, path = fsspec.core.url_to_fs(str(folder))
    if not fs.isdir(path):
        raise ModelDirError(f"model folder not found: {folder}")
    missing = [n for n in REQUIRED if not fs.exists(f"{path.rstrip('/')}/{n}")]
    if missing:
        raise ModelDirError(f"model folder {folder} is missing {', '.join(missing)} (a distrain model/ folder "
                            f"holds {', '.join(REQUIRED)})")
    meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{folder}/config.json has format {meta.get('format')!r}; this distrain reads "
                            f"{FORMAT!r}")
    for key in ("backbone", "classes", "preprocess"):
        if key not in meta:
            raise ModelDirError(f"{folder}/config.json lacks '{key}'")
    model = create_model(meta["backbone"], len(meta["classes"]), weights="none", unfreeze_depth=0,
                         dropout=meta.get("dropout", 0.0), head_hidden=meta.get("head_hidden", 0))
    state = load_safetensors(fs.cat_file(f"{path.rstrip('/')}/weights.safetensors"))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelDirError(f"{folder}/weights.safetensors does not fit {meta['backbone']}: missing "
                            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), preprocess=meta["preprocess"], meta=meta)
