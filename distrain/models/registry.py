"""Backbone names and how each is built: offline package weights, torchvision, timm, or a weights file.

Usage:
    from distrain.models.registry import build_backbone, list_backbones, resolve_name
    list_backbones("offline")                     # ['efficientnet_lite0', 'mobilenet_v2']
    resolve_name("torchvision:resnet50")          # ('torchvision:resnet50', 'torchvision:resnet50')
    built = build_backbone("efficientnet_lite0", weights="default")
    built.backbone(x)                             # (N, built.info.num_features) pooled features
    built.info                                    # BackboneInfo: input size, mean/std, weights source

Names:
    efficientnet_lite0, mobilenet_v2, ...   offline: ImageNet weights inside installed packages (offline.py)
    torchvision:<name>                      any torchvision classification model; weights by enum name
    timm:<name>[.<tag>]                     any timm model; pretrained weights from the Hugging Face hub
Weights (`model.weights`): `default`, `none`, a torchvision enum name, or a path/URL of a state dict.

The backbone is the library's model with its classifier replaced by Identity (and the dropout right before it,
since the new head brings its own), so it maps images to pooled features and its state-dict keys stay those of
the library: weights files written for the original model load into it as they are.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distrain.models.errors import ModelError
from distrain.models.offline import IMAGENET_MEAN, IMAGENET_STD, OFFLINE, offline_state_dict
from distrain.models.weights import (
    WeightsError,
    cache_dir,
    load_backbone_weights,
    read_state_dict,
    require_network,
)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass
class BackboneInfo:
    """What the rest of distrain needs to know about a backbone (written to `model/config.json`)."""

    name: str                  # canonical: 'efficientnet_lite0', 'torchvision:resnet50', 'timm:convnext_tiny'
    arch: str                  # what was built: 'timm:tf_efficientnet_lite0', 'torchvision:mobilenet_v2', ...
    input_size: int            # side of the square input the weights were trained at
    mean: tuple                # per-channel normalization of RGB inputs in [0, 1]
    std: tuple
    interpolation: str = "bilinear"
    crop_pct: float = 0.875    # eval: resize the short side to input_size / crop_pct, center-crop input_size
    weights: str = "default"   # the weights spec asked for (rebuilds frozen parts when checkpoints omit them)
    weights_source: str = "none"   # where they came from: package file, enum, hub id, path or URL, or 'none'
    num_features: int = 0      # width of the pooled features the head sees


@dataclass
class BuiltBackbone:
    backbone: nn.Module
    info: BackboneInfo
    dropped: list[str]         # prefixes of the removed classifier (ignored in weights files)
    flatten: bool = False      # the backbone returns its final feature map (head_pool=flatten): flatten it


def _offline_hint() -> str:
    ready = [n for n, e in OFFLINE.items() if e.installed()]
    return (f"Offline alternatives with ImageNet weights inside installed packages: {', '.join(ready)} "
            f"(model.backbone={ready[0] if ready else 'efficientnet_lite0'}), or model.weights=none, or a "
            "local weights file in model.weights.")


# --- names --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


@functools.lru_cache(maxsize=2)
def _timm_names(pretrained: bool = False) -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models(pretrained=pretrained))


def list_backbones(source: str = "all", pattern: str | None = None) -> list[str]:
    """Backbone names: `offline` (installed packages only), `torchvision`, `timm` (architectures; add a
    pretrained tag such as `.a1_in1k` to pick weights), or `all`. `pattern`: substring or glob, any case."""
    if source not in ("all", "offline", "torchvision", "timm"):
        raise ModelError(f"unknown backbone source {source!r}: use all, offline, torchvision or timm")
    names: list[str] = []
    if source in ("all", "offline"):
        names += [n for n, e in OFFLINE.items() if e.installed()]
    if source in ("all", "torchvision"):
        names += [f"torchvision:{n}" for n in _torchvision_names()]
    if source in ("all", "timm"):
        names += [f"timm:{n}" for n in _timm_names()]
    if pattern:
        import fnmatch

        pat = pattern.lower()
        names = [n for n in names if (fnmatch.fnmatch(n.lower(), pat) if any(c in pat for c in "*?[")
                                      else pat in n.lower())]
    return names


def close_matches(name: str, n: int = 6) -> list[str]:
    candidates = list(OFFLINE) + list_backbones("torchvision") + list_backbones("timm")
    query = name.lower()
    bare = ":" not in query

    def score(c: str) -> float:
        target = (c.split(":", 1)[-1] if bare else c).lower()
        # A name the query begins (mobilenet_v3 → mobilenet_v3_small) beats one that is merely similar.
        bonus = 0.5 if target.startswith(query) else 0.25 if query in target else 0.0
        return difflib.SequenceMatcher(None, query, target).ratio() + bonus

    scored = sorted(((score(c), c) for c in candidates), key=lambda t: -t[0])
    return [c for s, c in scored[:n] if s >= 0.6]


def resolve_name(name: str) -> tuple[str, str]:
    """(canonical name, architecture to build); ModelError listing close matches for an unknown name."""
    raw = (name or "").strip()
    if raw in OFFLINE:
        return raw, OFFLINE[raw].arch
    lib, sep, arch = raw.partition(":")
    lib = lib.lower()
    if sep and lib == "torchvision" and arch in _torchvision_names():
        return f"torchvision:{arch}", f"torchvision:{arch}"
    if sep and lib == "timm" and arch:
        import timm

        base, _, tag = arch.partition(".")
        if timm.is_model(base) and (not tag or arch in _timm_names(True)):
            return f"timm:{arch}", f"timm:{arch}"
        if timm.is_model(base):
            tags = [t for t in _timm_names(True) if t.startswith(base + ".")]
            raise ModelError(f"timm has no pretrained tag {arch!r}; tags of {base}: "
                             f"{', '.join(tags) or 'none'}")
    matches = close_matches(raw)
    hint = f"; did you mean: {', '.join(matches)}?" if matches else ""
    offline = [n for n, e in OFFLINE.items() if e.installed()]
    raise ModelError(f"unknown backbone {raw!r}{hint} (names: an offline one such as {', '.join(offline)}, "
                     "torchvision:<name> or timm:<name>; `distrain models` lists them)")


def weights_kind(weights: str) -> str:
    """'default', 'none', 'enum' (a torchvision weights enum name) or 'file' (a path or URL)."""
    w = (weights or "default").strip()
    if w.lower() in ("default", "pretrained", "imagenet"):
        return "default"
    if w.lower() in ("none", "random", "scratch"):
        return "none"
    if "://" in w or "/" in w or w.endswith(WEIGHT_SUFFIXES) or Path(w).expanduser().exists():
        return "file"
    if re.fullmatch(r"([A-Za-z0-9_]+\.)?[A-Z0-9_]+", w):
        return "enum"
    return "file"


# --- torchvision --------------------------------------------------------------------------------------------

def _torchvision_enum(arch: str, name: str):
    import torchvision.models as tvm

    try:
        enum_cls = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ModelError(f"torchvision:{arch} has no pretrained weights; use model.weights=none or a file") from None
    member = name.rsplit(".", 1)[-1]
    if member == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[member]
    except KeyError:
        valid = ", ".join(["DEFAULT"] + [e.name for e in enum_cls])
        raise ModelError(f"unknown weights {name!r} for torchvision:{arch}; valid: {valid}") from None


def _strip_classifier(model: nn.Module, arch: str) -> tuple[int, str]:
    """Replace the last Linear (and any dropout right before it) with Identity; its (in_features, name)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{arch}: no linear classifier to replace (not supported as a backbone)")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        for k in reversed(keys[:keys.index(child)]):
            if not isinstance(parent._modules[k], nn.Dropout):
                break
            parent._modules[k] = nn.Identity()
    return linear.in_features, name


def _build_torchvision(arch: str, weights: str, kind: str) -> tuple[nn.Module, str, object]:
    import torchvision.models as tvm

    builder = tvm.get_model_builder(arch)
    # The auxiliary classifiers of these two would return tuples in train mode; fine-tuning does not use them.
    kwargs = {"aux_logits": False} if arch in ("googlenet", "inception_v3") else {}
    enum = None
    if kind in ("default", "enum"):
        enum = _torchvision_enum(arch, "DEFAULT" if kind == "default" else weights)
        # Download with our probe and timeouts, into the file torchvision's own loader finds in its cache.
        # The file name carries a prefix of its sha256 (torch hub's convention), checked on download.
        url = enum.url
        dest = cache_dir() / Path(url).name
        if not dest.exists():
            require_network(url, f"torchvision:{arch} weights {enum}", _offline_hint())
            digest = torch.hub.HASH_REGEX.search(dest.name)
            try:
                torch.hub.download_url_to_file(url, str(dest),
                                               hash_prefix=digest.group(1) if digest else None)
            except Exception as e:
                raise WeightsError(f"could not download {url}: {type(e).__name__}: {e}. "
                                   f"{_offline_hint()}") from e
    if enum is None and arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # random init: skip scipy's slow truncated-normal init (and its warning)
    model = builder(weights=enum, **kwargs)
    source = f"torchvision {enum} ({Path(enum.url).name})" if enum is not None else "none"
    try:  # normalization of the weights used, or of the default ones for a random init / a file
        norm_enum = enum or _torchvision_enum(arch, "DEFAULT")
    except ModelError:
        norm_enum = None
    return model, source, norm_enum


def _torchvision_info(name: str, arch: str, norm_enum) -> dict:
    if norm_enum is None:
        return {"name": name, "arch": f"torchvision:{arch}", "input_size": 224, "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}
    t = norm_enum.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return {"name": name, "arch": f"torchvision:{arch}", "input_size": crop, "mean": tuple(t.mean),
            "std": tuple(t.std), "interpolation": t.interpolation.value, "crop_pct": round(crop / resize, 4)}


# --- timm ---------------------------------------------------------------------------------------------------

def _timm_cached_file(cfg) -> str | None:
    """A pretrained file of this timm config already on disk (HF cache or torch hub cache), or None."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        path = cache_dir() / Path(cfg.url).name
        if path.exists():
            return str(path)
    return None


def _build_timm(arch: str, kind: str) -> tuple[nn.Module, str]:
    import timm

    if kind != "default":
        return timm.create_model(arch, pretrained=False, num_classes=0), "none"
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"timm:{arch} has no pretrained weights; pick a tag (`distrain models --source timm "
                         f"--filter {arch.split('.')[0]}`) or use model.weights=none")
    cached = cfg.file or _timm_cached_file(cfg)
    if cached is None:
        if cfg.hf_hub_id:
            from huggingface_hub import constants

            url = f"{constants.ENDPOINT}/{cfg.hf_hub_id.partition('@')[0]}"
        else:
            url = cfg.url
        require_network(url, f"timm:{arch} pretrained weights", _offline_hint())
        source = f"timm hub {cfg.hf_hub_id or cfg.url}"
    else:
        source = f"timm {cached}"
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": cached} if cached else None)
    except ModelError:
        raise
    except Exception as e:  # a download that failed midway, a hub error: one line, with the way out
        raise WeightsError(f"could not load timm:{arch} pretrained weights: {type(e).__name__}: {e}. "
                           f"{_offline_hint()}") from e
    return model, source


def _timm_info(name: str, arch: str, model: nn.Module) -> dict:
    cfg = model.pretrained_cfg
    return {"name": name, "arch": f"timm:{arch}", "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
            "mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "std": tuple(cfg.get("std", IMAGENET_STD)),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "crop_pct": float(cfg.get("crop_pct", 0.875))}


def _timm_dropped(model: nn.Module) -> list[str]:
    clf = model.pretrained_cfg.get("classifier") or "classifier"
    return list(clf) if isinstance(clf, (list, tuple)) else [clf]


# --- building -----------------------------------------------------------------------------------------------

def _drop_vgg_top(model: nn.Module) -> list[str]:
    """VGG without fc6+fc7 (Keras' include_top=False): the conv base, average-pooled to 7x7 and flattened."""
    model.classifier = nn.Identity()
    return ["classifier"]


def _unpool(model: nn.Module, lib: str, arch: str) -> None:
    """head_pool=flatten: remove the backbone's global pooling, so its output is the final feature map."""
    if lib == "timm":
        model.reset_classifier(0, global_pool="")
        return
    pool = getattr(model, "avgpool", None)
    if not isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        raise ModelError(f"model.head_pool=flatten is not supported for {lib}:{arch}: its pooling is inside its "
                         f"forward(), not a module distrain can remove (use head_pool=avg, or a timm model)")
    model.avgpool = nn.Identity()


def _feature_width(model: nn.Module, size: int) -> int:
    """Width of the backbone's (flattened) output for a size x size input: one forward pass on zeros."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    return int(out[0].numel())


def build_backbone(name: str, weights: str = "default", *, vgg_top: str = "keep", head_pool: str = "avg",
                   image_size: int = 0) -> BuiltBackbone:
    """The backbone `name` without its classifier, with `weights` loaded (see the module docstring).

    vgg_top: `drop` removes VGG's fc6+fc7 (the conv base feeds the head). head_pool: `flatten` removes the global
    pooling; the head then sees the flattened final feature map, whose width depends on `image_size`."""
    canonical, arch_full = resolve_name(name)
    lib, arch = arch_full.split(":", 1)
    weights = (weights or "default").strip()
    kind = weights_kind(weights)
    offline = OFFLINE.get(canonical)

    if lib == "timm":
        if kind == "enum":
            raise ModelError(f"weights {weights!r} look like a torchvision enum name, but {canonical} is a "
                             "timm model: timm picks weights by tag (e.g. timm:resnet50.a1_in1k) or a file")
        model, source = _build_timm(arch, "none" if offline is not None else kind)
        info = _timm_info(canonical, arch, model)
        dropped = _timm_dropped(model)
        num_features = getattr(model, "head_hidden_size", None) or model.num_features
    else:
        model, source, norm_enum = _build_torchvision(arch, weights, "none" if offline is not None and
                                                      kind == "default" else kind)
        info = _torchvision_info(canonical, arch, norm_enum)
        if arch.startswith("vgg") and vgg_top == "drop":
            dropped = _drop_vgg_top(model)
            num_features = 0  # measured below
        else:
            num_features, clf = _strip_classifier(model, canonical)
            dropped = [clf]

    if offline is not None and kind in ("default", "none"):
        info.update(input_size=offline.input_size, mean=offline.mean, std=offline.std,
                    interpolation=offline.interpolation, crop_pct=offline.crop_pct)
    if offline is not None and kind == "default":
        sd, _ = offline_state_dict(canonical, model)
        load_backbone_weights(model, sd, dropped, source=f"{offline.distribution} ({canonical})")
        source = offline.source()
    elif kind == "file":
        load_backbone_weights(model, read_state_dict(weights), dropped, source=weights)
        source = weights
    flatten = head_pool == "flatten"
    if flatten:
        _unpool(model, lib, arch)
    if flatten or not num_features:
        num_features = _feature_width(model, image_size or info["input_size"])
    info = BackboneInfo(**info, weights=weights, weights_source=source, num_features=int(num_features))
    return BuiltBackbone(model, info, dropped, flatten=flatten)
