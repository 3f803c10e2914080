"""The per-worker step core, without Ray: model, freezing, memory format, DDP wrap, optimizer, loaders, the step loop.

Usage (inside any torch.distributed process group, or none):
    from distrain.train.core import setup
    w = setup(cfg, manifest, rank=rank, world=world, device=device)   # checkpoint=checkpoint.read(...) to resume
    for epoch in range(w.start_epoch, cfg.train.epochs):
        w.begin_epoch(epoch)                       # enters the epoch's phase: depth, DDP wrap, optimizer, schedule
        run = w.stepper.run_epoch(w.train_loader, epoch, w.world)
        meter, wrong, errors = w.validate()

Ray Train's worker function (train/loop.py), the torchrun baseline of `distrain bench train` and `distrain bench gpu`
all call `setup` and `Stepper.run_epoch`, so a benchmark of one against the other measures the launcher, and a GPU
check exercises the code real training runs. Nothing here imports Ray.

Phases (train.phases): each phase sets its own unfreeze depth, learning rates, warmup and augmentation. At a
boundary `begin_epoch` changes `requires_grad` and train/eval mode of the stages (frozen BatchNorm stays in eval
mode), rebuilds the DDP wrapper and the optimizer and schedule for the new trainable set (carrying AdamW/SGD state
of parameters that stay trainable), and checks on every rank that the trainable set and the parameter digests agree.
Rebuilding the wrapper is the point: DDP registers its gradient hooks for the parameters that require gradients when
it is built, so parameters unfrozen later would never be all-reduced and the replicas would drift apart.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distrain.device import amp_settings


class ReplicaMismatch(RuntimeError):
    """Ranks disagree on the trainable set or the parameters after a phase boundary (a DDP bug, never silent)."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio, per optimizer step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compute_threads(cfg, cpus_per_worker: float) -> int:
    """Threads for a worker's compute: its CPUs minus those its loader workers use (more only thrash)."""
    if cfg.data.engine == "ray_data":  # its decoding runs in Ray Data tasks, on CPUs of their own
        return max(1, int(cpus_per_worker))
    return max(1, int(cpus_per_worker) - cfg.data.loader_workers)


def param_digest(model: torch.nn.Module, names: set[str] | None = None) -> str:
    """A digest of the parameters (not buffers: BatchNorm statistics legitimately differ between DDP replicas,
    since each rank updates them from its own batches and DDP only broadcasts rank 0's before each forward)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if names is not None and name not in names:
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(value: float, device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return float(t.item())


def all_gather(obj: Any) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Phase:
    """One phase of a run: epochs [start, stop) with the config those epochs train under."""

    index: int          # 0-based
    start: int
    stop: int
    cfg: Any            # the run's config with the phase's overrides applied

    @property
    def epochs(self) -> int:
        return self.stop - self.start


def phases(cfg) -> list[Phase]:
    """train.phases as Phase objects (one phase of train.epochs when the list is empty)."""
    if not cfg.train.phases:
        return [Phase(0, 0, cfg.train.epochs, cfg)]
    out, start = [], 0
    for i, p in enumerate(cfg.train.phases):
        overrides = {k: v for k, v in p.items() if k != "epochs"}
        out.append(Phase(i, start, start + p["epochs"], cfg.replace(overrides) if overrides else cfg))
        start += p["epochs"]
    return out


def phase_of(cfg, epoch: int) -> Phase:
    plan = phases(cfg)
    return next((p for p in plan if p.start <= epoch < p.stop), plan[-1])


# --------------------------------------------------------------------------------------------------- the step loop


class Stepper:
    """Optimizer, schedule, AMP and the step loop of one epoch, for one phase's trainable set."""

    def __init__(self, cfg, model, ddp_model, device, micro_batches: int, num_classes: int, prepare,
                 phase_epochs: int | None = None, previous: Stepper | None = None):
        from distrain.data import Mixup
        from distrain.models import param_groups

        self.cfg, self.model, self.ddp_model, self.device = cfg, model, ddp_model, device
        self.micro_batches, self.prepare = micro_batches, prepare
        groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay)
        if cfg.optim.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        if previous is not None:  # a phase boundary: parameters that stay trainable keep their moments
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p in previous.optimizer.state:
                        self.optimizer.state[p] = previous.optimizer.state[p]
        self.steps_per_epoch = max(1, micro_batches // cfg.optim.grad_accum)
        self.total_steps = self.steps_per_epoch * (phase_epochs or cfg.train.epochs)
        warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        # The schedule counts optimizer steps of the whole run (its state is the global step, across phases);
        # each phase warms up and decays over its own steps, from the step it starts at.
        offset = previous.global_step if previous is not None else 0
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s - offset, warmup_steps, self.total_steps, cfg.optim.min_lr_ratio),
            last_epoch=offset - 1)
        self.amp_dtype, self.use_scaler = amp_settings(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_scaler)
        if previous is not None:
            self.scaler.load_state_dict(previous.scaler.state_dict())
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.mix = Mixup(cfg.data.mixup, cfg.data.cutmix, num_classes)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.global_step = previous.global_step if previous is not None else 0
        self.stop_requested = None  # a callable: True when the run should stop (Tune's stop, Ctrl-C)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, config_hparams: bool = False) -> None:
        """Restore optimizer, schedule and scaler. config_hparams: keep this config's learning rates and weight
        decay instead of the checkpoint's (a PBT trial that took over another's checkpoint with new values)."""
        fresh = [(g["initial_lr"], g["weight_decay"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if config_hparams:
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for g, (lr, wd) in zip(self.optimizer.param_groups, fresh):
                g["initial_lr"], g["weight_decay"], g["lr"] = lr, wd, lr * factor
            self.scheduler.base_lrs = [lr for lr, _ in fresh]

    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)  # the head's

    def _stop_flag(self) -> torch.Tensor:
        """Whether any rank was asked to stop, as a device scalar: one tiny all-reduce, so every rank stops after
        the same step."""
        flag = torch.tensor([1.0 if self.stop_requested() else 0.0], device=self.device)
        if distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag[0]

    def run_epoch(self, loader, epoch: int, world: int, log_every: int = 0, on_log=None) -> dict:
        cfg, device, accum = self.cfg, self.device, self.cfg.optim.grad_accum
        self.ddp_model.train()
        t0 = time.perf_counter()
        t_log, seen_log = t0, 0
        seen, decode_errors, first_step_at = 0, 0, None
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # on the device: no sync per step
        # On a GPU the host runs ahead of the device; reading the gradient norm or the stop flag at once would
        # stall it every step (and with it the next batch's decode and copy). There, both are read one step
        # later through a pinned copy and an event (Later): a non-finite step still stops every rank before
        # the epoch's checkpoint, and a stop still ends every rank after the same step.
        pending: tuple[int, Later, torch.Tensor] | None = None
        pending_stop: Later | None = None
        self.optimizer.zero_grad(set_to_none=True)

        def stopped() -> dict:
            return {"status": "stopped", "epoch": epoch, "step": self.global_step, "seen": seen,
                    "loss_sum": float(loss_sum), "decode_errors": decode_errors, "first_step_at": first_step_at,
                    "train_time": time.perf_counter() - t0}

        for i, batch in enumerate(loader):
            x = self.prepare(batch)
            y = batch.labels.to(device, non_blocking=True)
            x, target = self.mix(x, y)
            last_micro = (i + 1) % accum == 0 or i + 1 == self.micro_batches
            # Skip the gradient all-reduce on all but the last micro-batch of an accumulated step.
            no_sync = not last_micro and hasattr(self.ddp_model, "no_sync")
            with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.ddp_model(x), target)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            decode_errors += int(batch.decode_errors)
            if not last_micro:
                continue
            self.scaler.unscale_(self.optimizer)
            # The norm is computed after the all-reduce, so it is identical on every rank: a non-finite one
            # stops all ranks together, with no extra collective and no rank left waiting.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.optim.grad_clip or float("inf"))
            if not self.use_scaler:  # (the GradScaler skips non-finite steps itself)
                if pending is not None and not math.isfinite(pending[1].value()):
                    return self._nan(epoch, *pending, first_step_at)
                pending = (self.global_step, Later(grad_norm), loss.detach())
                if device.type != "cuda" and not math.isfinite(pending[1].value()):
                    return self._nan(epoch, *pending, first_step_at)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            if first_step_at is None:
                first_step_at = time.time()  # wall clock: the driver compares it with its own start
            if on_log and log_every and self.global_step % log_every == 0:
                now = time.perf_counter()
                on_log(self.global_step, i, float(loss.detach()), (seen - seen_log) * world / max(1e-9, now - t_log),
                       self.lr())
                t_log, seen_log = now, seen
            if self.stop_requested is not None:
                if pending_stop is not None and pending_stop.value():
                    return stopped()
                pending_stop = Later(self._stop_flag())
                if device.type != "cuda" and pending_stop.value():
                    return stopped()
        if pending is not None and not math.isfinite(pending[1].value()):
            return self._nan(epoch, *pending, first_step_at)
        if pending_stop is not None and pending_stop.value():
            return stopped()
        return {"status": "ok", "loss_sum": float(loss_sum), "seen": seen, "decode_errors": decode_errors,
                "train_time": time.perf_counter() - t0, "first_step_at": first_step_at}

    @staticmethod
    def _nan(epoch: int, step: int, _norm, loss: torch.Tensor, first_step_at) -> dict:
        return {"status": "nan", "epoch": epoch, "step": step, "first_step_at": first_step_at,
                "message": f"loss/gradients became non-finite at epoch {epoch + 1}, step {step} "
                           f"(loss {float(loss):.4g})"}


class Later:
    """A device scalar to read later without stalling the stream: on CUDA a non-blocking copy into pinned memory
    and an event recorded after it; elsewhere the value itself (nothing runs ahead on a CPU)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty((), dtype=t.dtype, pin_memory=True)
            self.host.copy_(t.reshape(()), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


# --------------------------------------------------------------------------------------------------- setup


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the model when there are several ranks (what ray.train.torch.prepare_model does for DDP)."""
    if not distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Frozen parameters (requires_grad=False) get no buckets, so find_unused_parameters=False holds.
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


@dataclass
class Worker:
    """One rank's training state: what `setup` builds and `begin_epoch` moves from phase to phase."""

    cfg: Any
    rank: int
    world: int
    device: torch.device
    manifest: Any
    model: Any
    ddp_model: Any
    prepare: Any
    val_loader: Any
    train_loader: Any = None
    stepper: Stepper | None = None
    phase: Phase | None = None
    start_epoch: int = 0
    seed: int = 0
    decode: str = "cpu"  # data.decode resolved for the device
    init_from_other: bool = False  # the checkpoint is train.init_from's (another run's): this config's hparams
    history: list = field(default_factory=list)
    checkpoint_meta: dict | None = None
    stop_requested: Any = None  # a callable polled after every step (Tune stopped the trial, Ctrl-C)
    make_loader: Any = None     # (manifest, loader_args) → a loader; None = create_loader (data.engine=loader)
    _state: dict | None = None  # optimizer state of the checkpoint, loaded when its phase is entered

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def spec(self):
        return self.model.spec

    def begin_epoch(self, epoch: int) -> bool:
        """Set the loader's epoch; at the first epoch of a phase (or on resume) enter it. True at a phase change."""
        phase = phase_of(self.cfg, epoch)
        changed = self.phase is None or phase.index != self.phase.index
        if changed:
            self._enter(phase)
        self.train_loader.set_epoch(epoch)
        return changed

    def _enter(self, phase: Phase) -> None:
        from distrain.data import loader_args

        cfg = phase.cfg
        previous = self.stepper
        resumed_phase = None
        if previous is None and self._state is not None:
            # Resuming: rebuild the checkpoint's own phase first, so its optimizer state has parameters to fit.
            resumed_phase = int((self.checkpoint_meta or {}).get("phase", phase.index))
            if resumed_phase != phase.index:
                self._enter(phases(self.cfg)[resumed_phase])
                previous = self.stepper
        depth = cfg.model.unfreeze_depth
        if previous is not None or self.model.unfreeze_depth != self.model.resolve_depth(depth):
            self.model.apply_unfreeze(depth)
            if previous is not None:
                old = self.ddp_model
                self.ddp_model = None
                del old
                gc.collect()  # the old reducer's gradient hooks go with it
            self.ddp_model = wrap(self.model, self.device)
        elif self.ddp_model is None:
            self.ddp_model = wrap(self.model, self.device)
        args = loader_args(cfg, rank=self.rank, world_size=self.world, image_size=self.spec.image_size,
                           crop_pct=self.spec.preprocess["crop_pct"], train=True, seed=self.seed,
                           epoch=phase.start, decode=self.decode)
        self.train_loader = self.make_loader(self.manifest, args)
        self.stepper = Stepper(cfg, self.model, self.ddp_model, self.device, len(self.train_loader),
                               self.model.num_classes, self.prepare, phase.epochs, previous=previous)
        self.stepper.stop_requested = self.stop_requested
        if self._state is not None and (resumed_phase is None or resumed_phase == phase.index):
            self.stepper.load_state_dict(self._state, config_hparams=self.init_from_other)
            self.stepper.global_step = int((self.checkpoint_meta or {}).get("global_step", 0))
            self._state = None
        self.phase = phase
        if previous is not None:
            check_replicas(self.model)

    def validate(self, misclassified_cap: int = 0):
        from distrain.validation import evaluate

        return evaluate(self.model, self.val_loader, self.prepare, self.model.num_classes,
                        self.stepper.amp_dtype if self.stepper else None, misclassified_cap)


def check_replicas(model) -> str:
    """After a phase boundary: every rank must hold the same trainable set and the same parameters."""
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    mine = (hashlib.sha256("\n".join(trainable).encode()).hexdigest()[:16], param_digest(model))
    everyone = all_gather(mine)
    if len(set(everyone)) != 1:
        raise ReplicaMismatch(f"ranks disagree after the phase boundary (trainable-set digest, parameter digest "
                              f"per rank: {everyone})")
    return mine[1]


def setup(cfg, manifest, *, rank: int = 0, world: int = 1, device: torch.device | None = None,
          checkpoint=None, decode: str | None = None, make_loader=None) -> Worker:
    """Build one rank's model, DDP wrapper, loaders and stepper for `cfg` (resuming `checkpoint` if given).
    `decode`: the resolved data.decode (default: data.decode for `device`; the GPU bench passes `gpu` on a CPU to
    test the device path there). `make_loader(manifest, args)`: where batches come from (default: create_loader;
    Ray Train's worker passes the ray_data engine's splits)."""
    from distrain.data import create_loader, loader_args
    from distrain.data.gpu import create_prepare, resolve_decode
    from distrain.models import ModelSpec, create_model
    from distrain.train import checkpoint as ckpt

    device = device or torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # the same head init on every rank (DDP also broadcasts rank 0's at the wrap)
    first = phases(cfg)[0]
    spec = ModelSpec.from_config(first.cfg.model, manifest.classes, cfg.data.image_size)
    start_epoch, seed, history, meta, state = 0, cfg.train.seed, [], None, None
    if checkpoint is not None:
        meta, state = checkpoint.meta, checkpoint.state
        saved = ckpt.spec_of(meta)
        spec = spec.replace(unfreeze_depth=saved.unfreeze_depth)
    model = create_model(spec)
    if checkpoint is not None:
        ckpt.restore(model, checkpoint)
        start_epoch, history = int(meta["epoch"]), list(meta.get("history") or [])
        seed = int((meta.get("data_position") or {}).get("seed", seed))
    model.to(device)
    if cfg.data.channels_last:  # NHWC: faster convolutions with cuDNN and with oneDNN on CPU (1.7x here)
        model.to(memory_format=torch.channels_last)
    pre = model.spec.preprocess
    decode = decode or resolve_decode(cfg.data.decode, device)
    prepare = create_prepare(cfg.data, device, pre["mean"], pre["std"], model.spec.image_size, decode)
    val_args = loader_args(cfg, rank=rank, world_size=world, image_size=model.spec.image_size,
                           crop_pct=pre["crop_pct"], train=False, seed=seed, decode=decode)
    make_loader = make_loader or (lambda m, args: create_loader(m, **args))
    val_loader = make_loader(manifest, val_args)
    return Worker(cfg=cfg, rank=rank, world=world, device=device, manifest=manifest, model=model, ddp_model=None,
                  prepare=prepare, val_loader=val_loader, start_epoch=start_epoch, seed=seed, history=history,
                  checkpoint_meta=meta, _state=state, decode=decode, make_loader=make_loader,
                  init_from_other=bool(checkpoint is not None and getattr(checkpoint, "init", False)))
