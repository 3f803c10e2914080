"""The config tree: one frozen dataclass per component, one documented field per setting.

Usage:
    from distrain.config.schema import ConfigTree, opt
    ConfigTree().optim.lr                      # 0.001 (the defaults)
    dataclasses.fields(ConfigTree)             # the sections: data, model, optim, train, scaling, tune, wandb

Each field is declared with `opt(default, help, range=...)`; its help text is the field's documentation (the README's
config reference is generated from it). Choices are `Literal[...]` annotations, so the type says what is valid.
Parsing, coercion and cross-field rules live apart, in `distrain/config/parse.py`, whose `Config` is this tree plus
`replace()`: this module only says what a run is. A config is built once, validated once and then frozen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default: Any, help: str, *, range: tuple | None = None) -> Any:
    """A documented config field. `range` is inclusive (lo, hi); None on a side means unbounded."""
    meta = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


# Run and sweep names become folder names: one path component, no hidden files, nothing that climbs out.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_RULE = "a letter or digit, then letters, digits, '.', '_' or '-' (at most 128 characters; no '/')"


@dataclass(frozen=True)
class AffineConfig:
    """Always-on geometric augmentation in the style of Keras' ImageDataGenerator (the seed recipe's rotation,
    shift, shear and zoom), applied after the crop and before the strength knob's ops. All zero = off."""

    rotation: float = opt(0.0, "Rotation range in degrees: each image turns by uniform(-r, r).", range=(0.0, 180.0))
    shift: float = opt(0.0, "Width/height shift range as a fraction of the side: uniform(-s, s) each way.",
                       range=(0.0, 1.0))
    shear: float = opt(0.0, "Shear range in degrees, as Keras' shear_range (degrees since Keras 2): "
                       "uniform(-s, s).", range=(0.0, 80.0))
    zoom: float = opt(0.0, "Zoom range: each axis scales by uniform(1 - z, 1 + z).", range=(0.0, 0.9))
    fill: Literal["nearest", "constant"] = opt("nearest", "How pixels that come from outside the image are "
                                               "filled: `nearest` edge pixel (Keras' default) or a constant gray.")


@dataclass(frozen=True)
class RayDataConfig:
    """data.engine=ray_data: shards decoded and augmented in Ray Data tasks, streamed into the Train workers."""

    node_label: str = opt("", "Run the read/decode tasks only on nodes with this Ray label, `key=value` (e.g. "
                          "`distrain-role=data`, set with `ray start --labels`); the Train workers then keep off "
                          "those nodes. Empty = any node with free CPUs.")
    cpus_per_task: float = opt(1.0, "CPUs one read/decode task reserves (one decoding thread each).",
                               range=(0.01, None))
    segment_samples: int = opt(256, "Samples per read task and block: a shard is cut into segments of at most "
                               "this many, so few large shards still spread over many tasks.", range=(1, None))
    prefetch_batches: int = opt(2, "Batches each Train worker keeps ready ahead of the step loop.",
                                range=(0, None))


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are streamed and augmented."""

    shards: str = opt("data/fashion-mnist", "Shards folder (local path or fsspec URL) holding `manifest.json`, "
                      "as written by `distrain shards build` or `distrain shards index`.")
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
    affine: AffineConfig = opt(AffineConfig(), "Always-on rotation/shift/shear/zoom (`data.affine.*`).")
    mixup: float = opt(0.0, "Mixup alpha (0 = off).", range=(0.0, None))
    cutmix: float = opt(0.0, "CutMix alpha (0 = off).", range=(0.0, None))
    train_limit: int = opt(0, "Use at most this many training samples per epoch, stratified by shard "
                           "(0 = all). For quick runs and sweeps.", range=(0, None))
    val_limit: int = opt(0, "Validate on at most this many samples (0 = all).", range=(0, None))
    shuffle_buffer: int = opt(1000, "Samples held in the shuffle buffer of each loader worker.", range=(0, None))
    channels_last: bool = opt(True, "Model and batches in channels_last (NHWC) memory format: faster "
                              "convolutions with cuDNN on GPU and with oneDNN on CPU.")
    decode: Literal["auto", "cpu", "gpu"] = opt("auto", "Where JPEGs are decoded and augmented: `cpu` in the loader "
                                                "workers; `gpu` on the training GPU (one batched nvJPEG decode per "
                                                "batch, then per-sample crops and augmentation on the device; the "
                                                "workers only read bytes and draw); `auto` = gpu on CUDA workers, "
                                                "else cpu.")
    read_timeout_s: float = opt(120.0, "Seconds a shard read may return nothing before the shard counts as "
                                "unreadable (hung NFS, a FIFO, a server that stopped sending).", range=(0.1, None))
    read_retries: int = opt(3, "Retries (with backoff) of a remote shard that fails to read, before it counts "
                            "as unreadable.", range=(0, None))
    engine: Literal["loader", "ray_data"] = opt("loader", "Who decodes and augments: `loader` = DataLoader "
                                                "processes beside each Train worker, on its node; `ray_data` = "
                                                "Ray Data tasks anywhere in the cluster (CPU-only nodes with "
                                                "`data.ray_data.node_label`), streamed into the workers. README: "
                                                "choosing an engine.")
    ray_data: RayDataConfig = opt(RayDataConfig(), "The ray_data engine's settings (`data.ray_data.*`).")
    max_bad_shards: int = opt(-1, "Unreadable shards tolerated per epoch (skipped, refilled from the others, and "
                              "listed) before the run stops naming them; -1 = 1% of the split's shards, at least "
                              "1.", range=(-1, None))


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained backbone, which weights, and how deep fine-tuning reaches."""

    backbone: str = opt("efficientnet_lite0", "Backbone name: an offline one (`distrain models` lists them), "
                        "`torchvision:<name>` or `timm:<name>`.")
    weights: str = opt("default", "`default` (the backbone's pretrained ImageNet weights), `none` (random init), a "
                       "torchvision weights enum name (e.g. `IMAGENET1K_V2`), or a path/URL of a .pth/.safetensors "
                       "state dict.")
    unfreeze_depth: int | Literal["all"] = opt(2, "Trailing backbone stages that train: 0 = head only (linear "
                                                  "probe), k = the last k stages, `all` = everything.",
                                               range=(0, None))
    dropout: float = opt(0.2, "Dropout before the new classifier.", range=(0.0, 0.99))
    head_hidden: int = opt(0, "Width of a hidden layer in the new head (0 = a single linear layer).",
                           range=(0, None))
    head_activation: Literal["gelu", "relu"] = opt("gelu", "Activation of the head's hidden layer.")
    head_pool: Literal["avg", "flatten"] = opt("avg", "How the final feature map reaches the head: global "
                                               "average pooling, or `flatten` (Keras' Flatten(); its width "
                                               "grows with the image size).")
    vgg_top: Literal["keep", "drop"] = opt("keep", "VGG only: keep the pretrained fc6+fc7 layers as a last stage "
                                           "(`keep`), or `drop` them (Keras' include_top=False: conv base → head).")
    save_frozen: bool = opt(False, "Also copy frozen backbone weights into checkpoints (otherwise they are named "
                            "by their source and reloaded from it).")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and loss."""

    name: Literal["adamw", "sgd"] = opt("adamw", "Optimizer.")
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


@dataclass(frozen=True)
class TrainConfig:
    """The training run itself."""

    name: str = opt("run", f"Stable run name: the run folder is scaling.storage_path/<name>, and running the "
                    f"same name again resumes from its last checkpoint. {NAME_RULE[0].upper()}{NAME_RULE[1:]}.")
    epochs: int = opt(3, "Training epochs (with train.phases: their sum).", range=(1, None))
    phases: list = opt([], "Staged fine-tuning: an ordered list of phases, each `{epochs: N, <key>: value, ...}` "
                       "with dotted overrides of model.unfreeze_depth, optim.lr, optim.layer_decay, "
                       "optim.weight_decay, optim.warmup_epochs, optim.min_lr_ratio or data.aug_strength; empty = "
                       "one phase of train.epochs.")
    seed: int = opt(0, "Seed for weights of the new head, shuffling and augmentation.")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "Mixed precision: `auto` (bf16 on GPUs that "
                                                      "support it, else fp16; off on CPU), `bf16`, `fp16` or "
                                                      "`off`.")
    max_failures: int = opt(0, "Worker failures tolerated; a failed worker group restarts from the last "
                            "checkpoint. -1 = no limit.", range=(-1, None))
    keep_checkpoints: int = opt(2, "Checkpoints kept, best first by val top-1.", range=(1, None))
    log_every: int = opt(20, "Log train loss, lr and images/s every this many optimizer steps.",
                         range=(1, None))
    tags: list = opt([], "Free-form tags, passed on to W&B (empty = WANDB_TAGS).")
    job_type: Literal["train", "trial"] = opt("train", "What this run is to W&B: a training run, or a trial of "
                                              "a sweep (set by `distrain tune`).")
    group: str = opt("", "W&B run group; empty = WANDB_RUN_GROUP, or none (a sweep sets it to tune.name).")
    init_from: str = opt("", "Start from this checkpoint folder (weights, optimizer state, epoch and history) when "
                         "the run folder has none of its own; the config's learning rates and weight decay apply "
                         "from there on. PBT sets it when a trial takes over another's checkpoint.")


@dataclass(frozen=True)
class ScalingConfig:
    """How many workers, on what, and where results live."""

    num_workers: int = opt(2, "Ray Train workers (DDP ranks).", range=(1, None))
    use_gpu: bool | Literal["auto"] = opt("auto", "`auto` uses GPUs when the cluster has them (NCCL), else "
                                                  "CPUs (gloo); true/false forces it.")
    cpus_per_worker: float = opt(0.0, "CPUs reserved per worker; 0 = data.loader_workers + 1. Fractions share a "
                                 "core (0.5: two workers per core; a population of small trials on a small "
                                 "machine, as PBT needs all of its trials at once).", range=(0.0, None))
    gpus_per_worker: float = opt(1.0, "GPUs per worker when GPUs are used.", range=(0.0, None))
    start_retries: int = opt(3, "Times a worker group that could not get its resources (60 s each) is retried; "
                             "autoscaling clusters need this while nodes come up. -1 = forever.", range=(-1, None))
    storage_path: str = opt("outputs", "Where runs, checkpoints and sweeps are written: a local folder (single "
                            "node), or `s3://`, `gs://` or an NFS path shared by all nodes.")
    collective_timeout_s: float = opt(1800.0, "Seconds a collective (an all-reduce, Ray Train's report barrier) may "
                                      "wait for a rank before the attempt fails and restarts from the last "
                                      "checkpoint (a lost or stuck rank).", range=(1.0, None))


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over dotted keys of this config tree."""

    name: str = opt("sweep", "Stable sweep name: running it again resumes the sweep. Same rule as train.name.")
    num_samples: int = opt(4, "Trials to sample.", range=(1, None))
    scheduler: Literal["asha", "fifo", "pbt", "pb2"] = opt(
        "asha", "Trial scheduler: `asha` stops weak trials at epoch rungs (grace_period × reduction_factor^k, below "
        "train.epochs); `fifo` runs every trial to the end; `pbt` (Population Based Training) lets the bottom "
        "quantile take over the weights and optimizer state of the top quantile every perturbation_interval "
        "epochs, with perturbed values of the space; `pb2` chooses the new values with a GP bandit (needs "
        "scikit-learn and scipy).")
    search_alg: Literal["random", "optuna"] = opt("random", "Search algorithm: random sampling or Optuna TPE.")
    metric: str = opt("val_top1", "Metric the sweep optimizes (reported once per epoch).")
    mode: Literal["max", "min"] = opt("max", "Maximize or minimize the metric.")
    max_concurrent_trials: int = opt(0, "Trials run at once; 0 = as many as the cluster's CPUs/GPUs hold (a trial "
                                     "holds its workers' CPUs/GPUs; its driver reserves none).", range=(0, None))
    grace_period: int = opt(1, "ASHA: epochs every trial runs before it can be stopped.", range=(1, None))
    perturbation_interval: int = opt(1, "PBT/PB2: epochs between exploit/explore steps.", range=(1, None))
    synch: bool = opt(False, "PBT/PB2: wait for the whole population at every perturbation_interval, then exploit "
                      "(the paper's synchronous variant: every trial compared at the same epoch, each trial's Train "
                      "run paused and restarted at each interval). False (Ray's default): each trial is compared "
                      "the moment it reports, against the others' latest scores; no waiting, but in a small "
                      "population the first trials to report at an interval have no checkpointed top trial to "
                      "take over yet.")
    quantile: float = opt(0.25, "PBT/PB2: the bottom fraction of trials that take over the top fraction's "
                          "checkpoints.", range=(0.0, 0.5))
    reduction_factor: int = opt(2, "ASHA: keep the top 1/reduction_factor at each rung.", range=(2, None))
    space: dict = opt({}, "Search space: dotted config key → distribution, e.g. `optim.lr: loguniform(1e-5, "
                      "1e-2)`, `model.unfreeze_depth: choice([0, 1, 2, all])`, `data.aug_strength: "
                      "uniform(0, 1)`. Also: randint(lo, hi) (both ends included), quniform(lo, hi, q), grid([..]) "
                      "(every value in turn, each num_samples times).")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases tracking. The API key is read from WANDB_API_KEY only, never from a config. Settings left
    at their default (empty, or `auto`) follow W&B's own environment variables, as a plain `wandb.init` would."""

    mode: Literal["auto", "online", "offline", "disabled"] = opt(
        "auto", "`auto` = WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline; or `online`, "
                "`offline`, `disabled`.")
    project: str = opt("", "W&B project; empty = WANDB_PROJECT, else `distrain`.")
    entity: str = opt("", "W&B entity (team or user); empty = WANDB_ENTITY, else the key's default.")
    dir: str = opt("", "Folder under which W&B writes its `wandb/` folder; empty = WANDB_DIR, else the run folder "
                   "(files land in <run folder>/wandb), or a local folder under ~/.cache/distrain/wandb when the "
                   "run folder is remote.")
    base_url: str = opt("", "W&B server URL for self-hosted W&B; empty = WANDB_BASE_URL or the W&B cloud.")
    log_model: bool = opt(False, "Upload the final model/ folder as a W&B artifact.")
    max_misclassified: int = opt(32, "Rows in the table of misclassified validation images.", range=(0, None))
    init_timeout: float = opt(60.0, "Seconds W&B may take to start before the run continues without it.",
                              range=(1.0, None))
    finish_timeout: float = opt(120.0, "Seconds the end of a run waits for W&B uploads; what is left stays on disk "
                                "for `wandb sync` (0 = wait for everything).", range=(0.0, None))


@dataclass(frozen=True)
class ConfigTree:
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
        """{'optim.lr': 0.001, 'data.affine.rotation': 0.0, ...}: one entry per leaf field (tune.space and
        train.phases stay one entry each)."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(value, f"{prefix}{f.name}.")
                else:
                    out[f"{prefix}{f.name}"] = value

        walk(self, "")
        return out

    def get(self, dotted: str) -> Any:
        """The value of a dotted leaf key: cfg.get('optim.lr')."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj
