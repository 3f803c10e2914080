"""The one config tree: a run is a config.

Usage:
    from distrain.config import load_config, save_config
    cfg = load_config("configs/fashion_mnist_cpu.yaml", ["optim.lr=3e-4", "data.aug_strength=0.5"])
    cfg.optim.lr                      # 0.0003
    save_config(cfg, run_dir / "config.yaml")

Every component has one dataclass (data, model, optim, train, scaling, tune, wandb); every field carries its
documentation in `metadata["help"]` (the README's config reference is generated from it, and a test keeps the two
in sync). YAML files in `configs/` set fields; `--set a.b=value` overrides them, values parsed as YAML. An unknown
key or a value of the wrong type raises `ConfigError` naming the key (and the closest valid one) before any work
starts. A Tune search space is just a mapping of dotted keys of this same tree to distributions (`tune.space`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


def opt(default: Any, help: str, *, choices: tuple | None = None, range: tuple | None = None) -> Any:
    """A documented config field. `range` is inclusive (lo, hi); None on a side means unbounded."""
    meta = {"help": help, "choices": choices, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed and augmented."""

    shards: str = opt("data/fashion-mnist", "Shards folder (local path or fsspec URL) holding `manifest.json`, "
                      "as written by `distrain shards build`.")
    train_split: str = opt("train", "Split of the manifest used for training.")
    val_split: str = opt("val", "Split of the manifest used for validation after every epoch.")
    batch_size: int = opt(64, "Samples per batch on each worker (the global batch is this × scaling.num_workers "
                          "× optim.grad_accum).", range=(1, None))
    loader_workers: int = opt(1, "DataLoader worker processes per training worker (0 = decode in the training "
                              "process). Each uses one thread.", range=(0, None))
    image_size: int = opt(0, "Side of the square training/eval image in pixels; 0 = the backbone's input size.",
                          range=(0, None))
    aug_strength: float = opt(0.3, "One knob for augmentation, 0 = resize + center crop only, 1 = strongest "
                              "(crop scale range, RandAugment magnitude, color jitter and random erasing grow "
                              "together; table in the README).", range=(0.0, 1.0))
    mixup: float = opt(0.0, "Mixup alpha (0 = off).", range=(0.0, None))
    cutmix: float = opt(0.0, "CutMix alpha (0 = off).", range=(0.0, None))
    train_limit: int = opt(0, "Use at most this many training samples per epoch, stratified by shard "
                           "(0 = all). For quick runs and sweeps.", range=(0, None))
    val_limit: int = opt(0, "Validate on at most this many samples (0 = all).", range=(0, None))
    shuffle_buffer: int = opt(1000, "Samples held in the shuffle buffer of each loader worker.", range=(0, None))
    channels_last: bool = opt(True, "Model and batches in channels_last (NHWC) memory format: faster "
                              "convolutions with cuDNN on GPU and with oneDNN on CPU.")


@dataclass
class ModelConfig:
    """Which pretrained backbone, which weights, and how deep fine-tuning reaches."""

    backbone: str = opt("efficientnet_lite0", "Backbone name: an offline one (`distrain models` lists them), "
                        "`torchvision:<name>` or `timm:<name>`.")
    weights: str = opt("default", "`default` (the backbone's pretrained ImageNet weights), `none` (random init), a "
                       "torchvision weights enum name (e.g. `IMAGENET1K_V2`), or a path/URL of a .pth/.safetensors "
                       "state dict.")
    unfreeze_depth: int | str = opt(2, "Trailing backbone stages that train: 0 = head only (linear probe), "
                                          "k = the last k stages, `all` = everything.")
    dropout: float = opt(0.2, "Dropout before the new classifier.", range=(0.0, 1.0))
    head_hidden: int = opt(0, "Width of a hidden layer in the new head (0 = a single linear layer).",
                           range=(0, None))
    save_frozen: bool = opt(False, "Also copy frozen backbone weights into checkpoints (otherwise they are named "
                            "by their source and reloaded from it).")


@dataclass
class OptimConfig:
    """Optimizer, schedule and loss."""

    name: str = opt("adamw", "Optimizer.", choices=("adamw", "sgd"))
    lr: float = opt(1e-3, "Peak learning rate of the head; backbone stages get lr × layer_decay^distance.",
                    range=(0.0, None))
    weight_decay: float = opt(0.05, "Weight decay (never applied to norms and biases).", range=(0.0, None))
    momentum: float = opt(0.9, "SGD momentum (and nesterov); ignored by AdamW.", range=(0.0, 1.0))
    layer_decay: float = opt(0.75, "Per-stage learning-rate decay from the head down into the backbone.",
                             range=(0.0, 1.0))
    warmup_epochs: float = opt(0.5, "Linear warmup length in epochs, then cosine decay per step.",
                               range=(0.0, None))
    min_lr_ratio: float = opt(0.01, "Final learning rate as a fraction of the peak.", range=(0.0, 1.0))
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0 = off).", range=(0.0, None))
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", range=(1, None))
    label_smoothing: float = opt(0.0, "Label smoothing of the cross-entropy loss (off by default: it can hurt "
                                 "transfer).", range=(0.0, 1.0))


@dataclass
class TrainConfig:
    """The training run itself."""

    name: str = opt("run", "Stable run name: the run folder is scaling.storage_path/<name>, and running the "
                    "same name again resumes from its last checkpoint.")
    epochs: int = opt(3, "Training epochs.", range=(1, None))
    seed: int = opt(0, "Seed for weights of the new head, shuffling and augmentation.")
    amp: str = opt("auto", "Mixed precision: `auto` (bf16 on GPUs that support it, else fp16; off on CPU), "
                   "`bf16`, `fp16` or `off`.", choices=("auto", "bf16", "fp16", "off"))
    max_failures: int = opt(0, "Worker failures tolerated; a failed worker group restarts from the last "
                            "checkpoint.", range=(-1, None))
    keep_checkpoints: int = opt(2, "Checkpoints kept, best first by val top-1.", range=(1, None))
    log_every: int = opt(20, "Log train loss, lr and images/s every this many optimizer steps.",
                         range=(1, None))
    tags: list = opt([], "Free-form tags, passed on to W&B.")


@dataclass
class ScalingConfig:
    """How many workers, on what, and where results live."""

    num_workers: int = opt(2, "Ray Train workers (DDP ranks).", range=(1, None))
    use_gpu: bool | str = opt("auto", "`auto` uses GPUs when the cluster has them (NCCL), else CPUs "
                                    "(gloo); true/false forces it.")
    cpus_per_worker: int = opt(0, "CPUs reserved per worker; 0 = data.loader_workers + 1.", range=(0, None))
    gpus_per_worker: float = opt(1.0, "GPUs per worker when GPUs are used.", range=(0.0, None))
    start_retries: int = opt(3, "Times a worker group that could not get its resources (60 s each) is retried; "
                             "autoscaling clusters need this while nodes come up. -1 = forever.", range=(-1, None))
    storage_path: str = opt("outputs", "Where runs, checkpoints and sweeps are written: a local folder (single "
                            "node), or `s3://`, `gs://` or an NFS path shared by all nodes.")


@dataclass
class TuneConfig:
    """Ray Tune sweep over dotted keys of this config tree."""

    name: str = opt("sweep", "Stable sweep name: running it again resumes the sweep.")
    num_samples: int = opt(4, "Trials to sample.", range=(1, None))
    scheduler: str = opt("asha", "Trial scheduler: `asha` stops weak trials at epoch rungs (grace_period × "
                         "reduction_factor^k, below train.epochs); `fifo` runs every trial to the end.",
                         choices=("asha", "fifo"))
    search_alg: str = opt("random", "Search algorithm: random sampling or Optuna TPE.",
                          choices=("random", "optuna"))
    metric: str = opt("val_top1", "Metric the sweep optimizes (reported once per epoch).")
    mode: str = opt("max", "Maximize or minimize the metric.", choices=("max", "min"))
    max_concurrent_trials: int = opt(0, "Trials run at once; 0 = as many as the cluster's CPUs/GPUs hold (a trial "
                                     "holds its workers' CPUs/GPUs; its driver reserves none).", range=(0, None))
    grace_period: int = opt(1, "ASHA: epochs every trial runs before it can be stopped.", range=(1, None))
    reduction_factor: int = opt(2, "ASHA: keep the top 1/reduction_factor at each rung.", range=(2, None))
    space: dict = opt({}, "Search space: dotted config key → distribution, e.g. `optim.lr: loguniform(1e-5, "
                      "1e-2)`, `model.unfreeze_depth: choice([0, 1, 2, all])`, `data.aug_strength: "
                      "uniform(0, 1)`. Also: randint(lo, hi) (both ends included), quniform(lo, hi, q), grid([..]) "
                      "(every value in turn, each num_samples times).")


@dataclass
class WandbConfig:
    """Weights & Biases tracking. The API key is read from WANDB_API_KEY only, never from a config."""

    mode: str = opt("auto", "`auto` = online when WANDB_API_KEY is set, else offline; or `online`, `offline`, "
                    "`disabled`.", choices=("auto", "online", "offline", "disabled"))
    project: str = opt("distrain", "W&B project.")
    entity: str = opt("", "W&B entity (team or user); empty = the key's default.")
    dir: str = opt("", "Folder under which W&B writes its `wandb/` folder; empty = the run folder (files land in "
                   "<run folder>/wandb), or a local folder under ~/.cache/distrain/wandb when the run folder is "
                   "remote.")
    base_url: str = opt("", "W&B server URL for self-hosted W&B; empty = WANDB_BASE_URL or the W&B cloud.")
    log_model: bool = opt(False, "Upload the final model/ folder as a W&B artifact.")
    max_misclassified: int = opt(32, "Rows in the table of misclassified validation images.", range=(0, None))
    init_timeout: float = opt(60.0, "Seconds W&B may take to start before the run continues without it.",
                              range=(1.0, None))
    finish_timeout: float = opt(120.0, "Seconds the end of a run waits for W&B uploads; what is left stays on disk "
                                "for `wandb sync` (0 = wait for everything).", range=(0.0, None))


@dataclass
class Config:
    """A whole distrain run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'optim.lr': 0.001, ...}: one entry per leaf field (tune.space stays one dict entry)."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted-key overrides applied (values already typed or YAML strings)."""
        cfg = from_dict(self.to_dict())
        for key, value in overrides.items():
            _set(cfg, key, value)
        validate(cfg)
        return cfg


# --------------------------------------------------------------------------------------------------- loading


def all_keys() -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotation `typ`, converting only where it is lossless."""
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(typ):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(typ))
        raise ConfigError(f"config key '{key}': expected {names}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    if typ is dict or origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def from_dict(raw: dict | None, source: str = "config") -> Config:
    """Build a Config from nested dicts; unknown keys and wrong types raise ConfigError."""
    cfg = Config()
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            # `optim.lr: 1e-3` written flat at the top level is also accepted.
            _set(cfg, str(section), values, source)
            continue
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, source)
    validate(cfg)
    return cfg


def _set(cfg: Config, dotted: str, value: Any, source: str = "override") -> None:
    parts = dotted.split(".")
    sections = _section_types()
    if parts[0] not in sections:
        raise ConfigError(f"{source}: unknown config section '{parts[0]}' in '{dotted}'"
                          f"{_closest(parts[0], list(sections))}; sections: {', '.join(sections)}")
    section_obj = getattr(cfg, parts[0])
    ftypes = _field_types(type(section_obj))
    if len(parts) < 2 or parts[1] not in ftypes:
        raise ConfigError(f"{source}: unknown config key '{dotted}'{_closest(dotted, all_keys())}")
    name, typ = parts[1], ftypes[parts[1]]
    if len(parts) > 2:
        # A dict field takes the rest as one key: tune.space.optim.lr=... sets space["optim.lr"].
        if not (typ is dict or typing.get_origin(typ) is dict):
            raise ConfigError(f"{source}: unknown config key '{dotted}'{_closest(dotted, all_keys())}")
        getattr(section_obj, name)[".".join(parts[2:])] = value
        return
    setattr(section_obj, name, _coerce(dotted, value, typ))


def validate(cfg: Config) -> None:
    """Choices and ranges from the field metadata, plus the few rules that span fields."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            key, value = f"{section.name}.{f.name}", getattr(obj, f.name)
            choices, rng = f.metadata.get("choices"), f.metadata.get("range")
            if choices and value not in choices:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
            if rng and isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = rng
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                    raise ConfigError(f"config key '{key}': {value!r} is outside {bounds}")
    depth = cfg.model.unfreeze_depth
    if isinstance(depth, str) and depth != "all":
        if depth.isdigit():
            cfg.model.unfreeze_depth = int(depth)
        else:
            raise ConfigError(f"config key 'model.unfreeze_depth': expected an integer >= 0 or 'all', got {depth!r}")
    if isinstance(cfg.model.unfreeze_depth, int) and cfg.model.unfreeze_depth < 0:
        raise ConfigError(f"config key 'model.unfreeze_depth': expected >= 0 or 'all', got {depth!r}")
    gpu = cfg.scaling.use_gpu
    if isinstance(gpu, str) and gpu != "auto":
        raise ConfigError(f"config key 'scaling.use_gpu': expected true, false or 'auto', got {gpu!r}")
    for key in cfg.tune.space:
        head = key.split(".")[0]
        if key not in all_keys() or head == "tune":
            raise ConfigError(f"config key 'tune.space': '{key}' is not a searchable config key"
                              f"{_closest(key, all_keys())}")


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' → ('optim.lr', 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or defaults when path is None) and apply dotted overrides."""
    raw: dict = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        source = str(p)
    cfg = from_dict(raw, source)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set(cfg, key, value, "--set")
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=100)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config; the file loads back with load_config to the same Config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_yaml(cfg))
    return p


def reference_markdown() -> str:
    """The config reference section of the README, generated from the field docs."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        lines.append(f"#### `{section.name}` — {(cls.__doc__ or '').strip()}\n")
        lines.append("| key | default | meaning |")
        lines.append("| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            extra = ""
            if f.metadata.get("choices"):
                extra = " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            help_text = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {help_text}{extra} |")
        lines.append("")
    return "\n".join(lines)
