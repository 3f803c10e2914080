"""The self-contained `model/` folder a training run leaves, and loading it back.

Usage:
    from distrain.modeldir import load_model_dir
    m = load_model_dir("outputs/fashion_mnist/model")      # local path or fsspec URL
    m.model.eval(); m.classes; m.preprocess                # {'image_size', 'resize', 'mean', 'std', ...}
    files = read_model_files("outputs/fashion_mnist/model")  # {'config.json': b'...', ...}: ship to Ray workers
    m = load_model_files(files, name="outputs/fashion_mnist/model", device="cuda")

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
    crop_pct = float(getattr(info, "crop_pct", 0.875))  # what training validated with (the backbone's)
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


def read_model_files(folder: str) -> dict[str, bytes]:
    """The files of a model folder as bytes, checked for presence: what Ray workers get instead of a path (a
    driver's local folder is not visible on other nodes)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(folder))
    if not fs.isdir(path):
        raise ModelDirError(f"model folder not found: {folder}")
    missing = [n for n in REQUIRED if not fs.exists(f"{path.rstrip('/')}/{n}")]
    if missing:
        raise ModelDirError(f"model folder {folder} is missing {', '.join(missing)} (a distrain model/ folder "
                            f"holds {', '.join(REQUIRED)})")
    return {n: fs.cat_file(f"{path.rstrip('/')}/{n}") for n in REQUIRED}


def read_meta(config_json: bytes, folder: str = "model") -> dict[str, Any]:
    """config.json of a model folder, checked: format version and the keys loading needs."""
    try:
        meta = json.loads(config_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{folder}/config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{folder}/config.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{folder}/config.json has format {meta.get('format')!r}; this distrain reads "
                            f"{FORMAT!r}")
    missing = [k for k in ("backbone", "classes", "preprocess") if k not in meta]
    missing += [f"preprocess.{k}" for k in ("image_size", "mean", "std") if k not in meta.get("preprocess", {})]
    if missing:
        raise ModelDirError(f"{folder}/config.json lacks {', '.join(repr(k) for k in missing)}")
    if meta.get("num_classes", len(meta["classes"])) != len(meta["classes"]):
        raise ModelDirError(f"{folder}/config.json: num_classes {meta['num_classes']} but {len(meta['classes'])} "
                            f"class names")
    return meta


def load_model_files(files: dict[str, bytes], name: str = "model", device: str | torch.device = "cpu"
                     ) -> LoadedModel:
    """Build the model from a model folder's files (see read_model_files); `name` appears in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from distrain.models import create_model

    meta = read_meta(files["config.json"], name)
    model = create_model(meta["backbone"], len(meta["classes"]), weights="none", unfreeze_depth=0,
                         dropout=meta.get("dropout", 0.0), head_hidden=meta.get("head_hidden", 0))
    try:
        state = load_safetensors(files["weights.safetensors"])
    except (SafetensorError, ValueError) as e:
        raise ModelDirError(f"{name}/weights.safetensors is not a readable safetensors file ({e})") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelDirError(f"{name}/weights.safetensors does not fit {meta['backbone']} with "
                            f"{len(meta['classes'])} classes: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelDirError(f"{name}/weights.safetensors does not fit {meta['backbone']}: missing "
                            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), preprocess=meta["preprocess"], meta=meta)


def load_model_dir(folder: str, device: str | torch.device = "cpu") -> LoadedModel:
    return load_model_files(read_model_files(folder), str(folder), device)
