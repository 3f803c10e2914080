"""The self-contained `model/` folder a training run leaves, and loading it back: a ModelSpec plus its weights.

Usage:
    from distrain.models.folder import load_model_dir, save_model_dir
    m = load_model_dir("outputs/fashion_mnist/model")      # local path or fsspec URL
    m.model.eval(); m.classes; m.preprocess                # {'image_size', 'resize', 'mean', 'std', ...}
    m.spec                                                 # the ModelSpec it was built from
    files = read_model_files("outputs/fashion_mnist/model")  # {'config.json': b'...', ...}: ship to Ray workers
    m = load_model_files(files, name="outputs/fashion_mnist/model", device="cuda")

Layout (format `distrain-model/2`):
    model/config.json          the ModelSpec (backbone, classes, head, preprocessing), where it came from (run, epoch,
                               val top-1)
    model/weights.safetensors  the whole state dict (frozen backbone included, so nothing else is needed)
    model/classes.txt          one class name per line, index = line number
The folder is written whole or not at all (distrain.storage.atomic_dir). `eval`, `predict` and `export` read only this
folder. Folders of format `distrain-model/1` (before the ModelSpec) load too.

It lives with the models, not with inference: training writes it and inference reads it, and both go through the
ModelSpec it serializes, so data flows one way (models → train → folder; folder → models → inference).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distrain.models.spec import ModelSpec, preprocessing

FORMAT = "distrain-model/2"
READABLE = ("distrain-model/1", FORMAT)
REQUIRED = ("config.json", "weights.safetensors")


class ModelDirError(ValueError):
    """A model folder that cannot be loaded, naming what is wrong or missing."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.spec.preprocess


def model_meta(model: torch.nn.Module, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a model folder: the spec (as the model was built), the backbone's info, provenance."""
    spec = model.spec
    return {"format": FORMAT, "spec": spec.to_dict(), "backbone": spec.backbone, "classes": list(spec.classes),
            "num_classes": spec.num_classes, "preprocess": spec.preprocess, "info": asdict(model.info),
            "provenance": provenance or {}}


def save_model_dir(model: torch.nn.Module, folder: str, provenance: dict[str, Any] | None = None) -> str:
    """Write model/ (locally, or to any fsspec URL) atomically: the old folder stays until the new one is whole.

    Class names must be valid UTF-8 (they are checked when shards are built); the weights are the whole state dict."""
    from safetensors.torch import save_file

    from distrain.redact import redact
    from distrain.storage import atomic_dir

    meta = redact(model_meta(model, provenance))
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / "weights.safetensors"))
        (Path(tmp) / "classes.txt").write_text("\n".join(model.spec.classes) + "\n", encoding="utf-8")
        (Path(tmp) / "config.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return folder


def read_model_files(folder: str) -> dict[str, bytes]:
    """The files of a model folder as bytes, checked for presence: what Ray workers get instead of a path (a
    driver's local folder is not visible on other nodes)."""
    from distrain.storage import fs_of

    fs, path = fs_of(str(folder))
    if not fs.isdir(path):
        raise ModelDirError(f"model folder not found: {folder}")
    missing = [n for n in REQUIRED if not fs.exists(f"{path.rstrip('/')}/{n}")]
    if missing:
        raise ModelDirError(f"model folder {folder} is missing {', '.join(missing)} (a distrain model/ folder "
                            f"holds {', '.join(REQUIRED)})")
    return {n: fs.cat_file(f"{path.rstrip('/')}/{n}") for n in REQUIRED}


def read_meta(config_json: bytes, folder: str = "model") -> dict[str, Any]:
    """config.json of a model folder, checked: format version and the keys loading needs; `spec` always present."""
    try:
        meta = json.loads(config_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{folder}/config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{folder}/config.json is not a JSON object")
    if meta.get("format") not in READABLE:
        raise ModelDirError(f"{folder}/config.json has format {meta.get('format')!r}; this distrain reads "
                            f"{', '.join(map(repr, READABLE))}")
    if meta["format"] == "distrain-model/1":  # before the ModelSpec: the same facts under other keys
        meta["spec"] = {"backbone": meta.get("backbone"), "classes": meta.get("classes"), "weights": "none",
                        "dropout": meta.get("dropout", 0.0), "head_hidden": meta.get("head_hidden", 0),
                        "image_size": (meta.get("preprocess") or {}).get("image_size", 0),
                        "preprocess": meta.get("preprocess") or {}}
    spec = meta.get("spec") or {}
    missing = [k for k in ("backbone", "classes", "preprocess") if not spec.get(k)]
    missing += [f"preprocess.{k}" for k in ("image_size", "mean", "std") if k not in (spec.get("preprocess") or {})]
    if missing:
        raise ModelDirError(f"{folder}/config.json lacks {', '.join(repr(k) for k in missing)}")
    if meta.get("num_classes", len(spec["classes"])) != len(spec["classes"]):
        raise ModelDirError(f"{folder}/config.json: num_classes {meta['num_classes']} but {len(spec['classes'])} "
                            f"class names")
    return meta


def load_model_files(files: dict[str, bytes], name: str = "model", device: str | torch.device = "cpu"
                     ) -> LoadedModel:
    """Build the model from a model folder's files (see read_model_files); `name` appears in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from distrain.models.classifier import create_model

    meta = read_meta(files["config.json"], name)
    saved = ModelSpec.from_dict(meta["spec"])
    # The weights file holds everything: build without pretrained weights, everything frozen (inference).
    model = create_model(saved.replace(weights="none", unfreeze_depth=0))
    try:
        state = load_safetensors(files["weights.safetensors"])
    except (SafetensorError, ValueError) as e:
        raise ModelDirError(f"{name}/weights.safetensors is not a readable safetensors file ({e})") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelDirError(f"{name}/weights.safetensors does not fit {saved.backbone} with "
                            f"{saved.num_classes} classes: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelDirError(f"{name}/weights.safetensors does not fit {saved.backbone}: missing "
                            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.to(device).eval()
    # The saved preprocessing is what the model was validated with: keep it over the rebuilt default.
    model.spec = model.spec.replace(preprocess=saved.preprocess or model.spec.preprocess,
                                    unfreeze_depth=saved.unfreeze_depth, weights=saved.weights)
    return LoadedModel(model=model, spec=model.spec, meta=meta)


def load_model_dir(folder: str, device: str | torch.device = "cpu") -> LoadedModel:
    return load_model_files(read_model_files(folder), str(folder), device)


__all__ = ["FORMAT", "LoadedModel", "ModelDirError", "load_model_dir", "load_model_files", "model_meta",
           "preprocessing", "read_meta", "read_model_files", "save_model_dir"]
