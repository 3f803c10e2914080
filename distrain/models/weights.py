"""Getting weights into a backbone: files, URLs and hub downloads, with fast failure when offline.

Usage:
    from distrain.models.weights import read_state_dict, load_backbone_weights, fetch
    sd = read_state_dict("s3://bucket/resnet50.pth")     # local path, http(s) or any fsspec URL; cached
    load_backbone_weights(backbone, sd, drop=["fc"], source="resnet50.pth")   # strict; names misfits

Files are read with `torch.load(weights_only=True)` (or safetensors), so a weights file cannot run code. A
file may hold the whole original model (its classifier keys, listed in `drop`, are ignored), only the
backbone, a distrain `model.pt` (keys under `backbone.`), or a training checkpoint wrapping the state dict
under `state_dict`/`model`. Anything else that does not fit (missing keys, unknown keys, other shapes) fails
with the keys named.

Remote files are downloaded once into torch's hub cache (`$TORCH_HOME/hub/checkpoints`), written to a
temporary name and renamed, so several DDP workers on one node can ask at once. Before any download the host
is probed with a short timeout: on a machine without internet the error comes in seconds, not after minutes of
retries. `DISTRAIN_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) forbids downloads outright; files already cached still
load.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import nn

from distrain.models.errors import ModelError
from distrain.storage import is_remote

NET_TIMEOUT = float(os.environ.get("DISTRAIN_NET_TIMEOUT", "3"))
_TRUE = {"1", "true", "yes", "on"}


class WeightsError(ModelError):
    """Weights that cannot be fetched, read or loaded; the message names the file and the keys."""


def offline_mode() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("DISTRAIN_OFFLINE", "HF_HUB_OFFLINE"))


def host_reachable(host: str, port: int = 443, timeout: float = NET_TIMEOUT) -> str | None:
    """None when a TCP connection to host:port opens within `timeout`, else the reason. DNS is bounded too: it
    runs in a thread, since getaddrinfo has no timeout of its own and can stall long on firewalled nodes."""
    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:.0f} s"


def require_network(url: str, what: str, alternatives: str = "") -> None:
    """Raise WeightsError now if `url` cannot be downloaded (offline mode or host unreachable)."""
    hint = f" {alternatives}" if alternatives else ""
    if offline_mode():
        raise WeightsError(f"{what} must be downloaded from {url}, but offline mode is set "
                           f"(DISTRAIN_OFFLINE/HF_HUB_OFFLINE).{hint}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        reason = host_reachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if reason:
            raise WeightsError(f"{what} must be downloaded from {url}, but {parts.hostname} cannot be "
                               f"reached ({reason}).{hint}")


def cache_dir() -> Path:
    d = Path(torch.hub.get_dir()) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_path(url: str, filename: str | None = None) -> Path:
    """Where `fetch` keeps the download of `url` (whether or not it is there yet)."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:10]
    return cache_dir() / (filename or f"distrain-{digest}-{Path(url.split('?')[0]).name}")


def fetch(url: str, filename: str | None = None, what: str = "weights", alternatives: str = "") -> Path:
    """Download `url` into the hub cache unless it is there; returns the local path.

    `filename` defaults to `distrain-<hash>-<basename>` so that two URLs with one basename do not collide;
    torch hub URLs pass their basename, which is where torchvision's own loader looks.
    """
    dest = cached_path(url, filename)
    if dest.exists():
        return dest
    require_network(url, what, alternatives)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        if urllib.parse.urlsplit(url).scheme in ("http", "https"):
            req = urllib.request.Request(url, headers={"User-Agent": "distrain"})
            with urllib.request.urlopen(req, timeout=30) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        else:
            import fsspec

            protocol = url.split("://", 1)[0]
            # botocore retries a dead endpoint for minutes by default; weights are small, give up sooner.
            opts = ({"config_kwargs": {"connect_timeout": NET_TIMEOUT, "retries": {"max_attempts": 2}}}
                    if protocol in ("s3", "s3a") else {})
            with fsspec.open(url, "rb", **opts) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except Exception as e:  # network, auth, missing object: one clear line naming the URL
        raise WeightsError(f"could not download {what} from {url}: {type(e).__name__}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# Checkpoint formats that wrap the state dict (training scripts, timm, Lightning, distrain checkpoints).
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema")


def read_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or URL (.pth/.pt/.bin read with weights_only=True, .safetensors)."""
    path = fetch(spec) if is_remote(spec) else Path(spec.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {spec}")
    try:
        if path.suffix == ".safetensors" or spec.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {spec}: {type(e).__name__}: {e}") from e
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise WeightsError(f"{spec} holds no state dict (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{spec} holds a {type(obj).__name__}, not a state dict")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP-wrapped model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_backbone_weights(backbone: nn.Module, sd: dict[str, torch.Tensor], drop: list[str],
                          source: str) -> int:
    """Load `sd` into `backbone` strictly, ignoring keys under the removed classifier's prefixes `drop`.

    Returns the number of tensors loaded. Raises WeightsError naming missing, unexpected and mis-shaped keys.
    """
    if sd and all(k.startswith(("backbone.", "head.")) for k in sd):  # a distrain Classifier state dict
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not any(k == p or k.startswith(p + ".") for p in drop)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
              for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing from the file: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_listing(unexpected)}")
        if shapes:
            problems.append(f"shape mismatch: {_listing(shapes, 4)}")
        raise WeightsError(f"weights {source} do not fit the backbone ({len(own)} tensors): "
                           + "; ".join(problems))
    backbone.load_state_dict(sd, strict=False)
    return len(sd)
