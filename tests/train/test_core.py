"""The step core without Ray: the schedule, AMP selection, loss and optimizer choices, gradient accumulation under
DDP, and phase boundaries in real gloo process groups (2 forked ranks), the pieces that otherwise run only inside
Ray Train runs.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import queue
import traceback
from datetime import timedelta

import pytest
import torch

from distrain.config import load_config
from distrain.device import amp_settings
from distrain.shards.manifest import load_manifest
from distrain.train.core import Stepper, lr_factor, param_digest, phases, setup
from tests.helpers import fast_train_overrides, free_port


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    warm, total, floor = 4, 20, 0.1
    factors = [lr_factor(s, warm, total, floor) for s in range(total + 3)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # step s of the warmup: (s + 1) / warmup
    assert factors[4] == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert factors[mid] == pytest.approx(floor + (1 - floor) * 0.5)  # half way down the cosine
    assert factors[total] == pytest.approx(floor) and factors[-1] == pytest.approx(floor)  # and it stays there
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))  # monotone after warmup
    assert lr_factor(0, 0, 10, 0.0) == 1.0 and lr_factor(10, 0, 10, 0.0) == pytest.approx(0.0)


def test_amp_is_chosen_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert [amp_settings(m, cpu) for m in ("auto", "bf16", "fp16", "off")] == [(None, False)] * 4
    cuda = torch.device("cuda")
    assert amp_settings("bf16", cuda) == (torch.bfloat16, False)
    assert amp_settings("fp16", cuda) == (torch.float16, True)  # fp16 needs a grad scaler
    assert amp_settings("off", cuda) == (None, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_settings("auto", cuda) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_settings("auto", cuda) == (torch.float16, True)


def _worker(cfg, shards, **extra):
    return setup(cfg.replace(extra) if extra else cfg, load_manifest(str(shards)))


def test_sgd_label_smoothing_and_parameter_groups(tiny_shards, tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{
        "optim.name": "sgd", "optim.momentum": 0.8, "optim.label_smoothing": 0.1, "optim.layer_decay": 0.5,
        "model.unfreeze_depth": 2}))
    w = _worker(cfg, tiny_shards)
    w.begin_epoch(0)
    opt = w.stepper.optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.8
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == pytest.approx(0.003)  # head at optim.lr, the last stage at lr × decay
    last = next(n for n in lrs if n.startswith("stage.") and not n.endswith(".no_wd"))
    assert lrs[last] == pytest.approx(0.003 * 0.5)
    logits, target = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    smoothed = -(0.9 + 0.1 / 3) * torch.log_softmax(logits, 1)[0, 0] - sum(
        (0.1 / 3) * torch.log_softmax(logits, 1)[0, k] for k in (1, 2))
    assert w.stepper.criterion(logits, target).item() == pytest.approx(smoothed.item(), rel=1e-6)
    run = w.stepper.run_epoch(w.train_loader, 0, 1)
    assert run["status"] == "ok" and w.stepper.global_step == len(w.train_loader)
    assert opt.state and all("momentum_buffer" in s for s in opt.state.values())


def _rank(rank, world, port, shards, storage, results):
    """One gloo rank: accumulation equivalence, a phase boundary, and a stop one rank asks for."""
    try:
        import torch.distributed as dist

        mp.set_start_method("fork", force=True)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        torch.set_num_threads(1)
        manifest = load_manifest(shards)
        base = fast_train_overrides(shards, storage, **{"data.batch_size": 4, "optim.grad_clip": 0.0,
                                                        "model.weights": "none", "optim.weight_decay": 0.0})
        out = {}
        # 1. Two micro-batches of 4 accumulated (no_sync on the first) = one step of the same 8 samples (head only,
        #    no dropout: nothing in the forward pass depends on the batch size).
        exact = {**base, "model.unfreeze_depth": 0, "model.dropout": 0.0}
        accumulated = load_config(None, {**exact, "optim.grad_accum": 2})
        w = setup(accumulated, manifest, rank=rank, world=world)
        w.begin_epoch(0)
        batches = [b for _, b in zip(range(2), w.train_loader)]
        w.stepper.micro_batches = 2
        w.stepper.run_epoch(batches, 0, world)
        out["accumulated"] = param_digest(w.model)
        out["accumulated_state"] = {k: v.numpy().copy() for k, v in w.model.head.state_dict().items()}
        whole = load_config(None, {**exact, "data.batch_size": 8})
        v = setup(whole, manifest, rank=rank, world=world)
        v.begin_epoch(0)
        merged = batches[0].__class__(torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
                                      torch.cat([b.valid for b in batches]), batches[0].keys + batches[1].keys)
        v.stepper.micro_batches = 1
        v.stepper.run_epoch([merged], 0, world)
        out["whole_state"] = {k: val.numpy().copy() for k, val in v.model.head.state_dict().items()}
        # 2. A phase boundary: head only, then the last 2 stages too.
        phased = load_config(None, {**base, "train.epochs": 2, "train.phases": [
            {"epochs": 1, "model.unfreeze_depth": 0}, {"epochs": 1, "model.unfreeze_depth": 2, "optim.lr": 0.01}]})
        p = setup(phased, manifest, rank=rank, world=world)
        stage = p.model.stages[-1]
        before = {n: t.detach().clone() for n, t in p.model.named_parameters() if n in stage.params}
        buffers = {n: t.clone() for n, t in p.model.named_buffers() if n in p.model.stages[0].buffers}
        for epoch in range(2):
            p.begin_epoch(epoch)
            p.stepper.run_epoch(p.train_loader, epoch, world)
            if epoch == 0:
                out["after_phase_1"] = all(torch.equal(before[n], t) for n, t in p.model.named_parameters()
                                           if n in before)
        after = dict(p.model.named_parameters())
        out["changed_in_phase_2"] = sum(not torch.equal(before[n], after[n]) for n in before)
        out["stage_params"] = len(before)
        out["digest"] = param_digest(p.model)
        out["frozen_bn_unchanged"] = all(torch.equal(buffers[n], t) for n, t in p.model.named_buffers()
                                         if n in buffers)
        out["trainable"] = sum(q.numel() for q in p.model.parameters() if q.requires_grad)
        # 3. Rank 1 is asked to stop: both stop after the same step.
        s = setup(load_config(None, base), manifest, rank=rank, world=world)
        s.begin_epoch(0)
        s.stepper.stop_requested = (lambda: s.stepper.global_step >= 2) if rank == 1 else (lambda: False)
        run = s.stepper.run_epoch(s.train_loader, 0, world)
        out["stopped"] = (run["status"], s.stepper.global_step)
        dist.destroy_process_group()
        results.put((rank, out))
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.timeout(300)
def test_accumulation_phase_boundaries_and_stops_under_real_ddp(tiny_shards, tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "distrain.train.core", "tests.train.test_core"])
    results, port, world = ctx.Queue(), free_port(), 2
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(tiny_shards), str(tmp_path), results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world):
            rank, out = results.get(timeout=240)
            assert not isinstance(out, str), f"rank {rank} failed:\n{out}"
            got[rank] = out
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(got))} hung")
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    a, b = got[0], got[1]
    # accumulation = the whole batch, on both ranks, and the ranks agree
    assert a["accumulated"] == b["accumulated"]
    for k in a["whole_state"]:
        assert torch.allclose(torch.from_numpy(a["accumulated_state"][k]), torch.from_numpy(a["whole_state"][k]),
                              atol=1e-6), k
    # the phase boundary: the newly trainable stage really trained, identically on both ranks (the DDP wrapper was
    # rebuilt, so its gradients were all-reduced); frozen BatchNorm statistics did not move
    assert a["after_phase_1"] and b["after_phase_1"]
    assert a["changed_in_phase_2"] == a["stage_params"] > 0
    assert a["digest"] == b["digest"] and a["trainable"] == b["trainable"]
    assert a["frozen_bn_unchanged"] and b["frozen_bn_unchanged"]
    # a stop asked for on one rank ends both after the same step
    assert a["stopped"] == b["stopped"] == ("stopped", 2)


def test_phases_split_the_epochs_and_apply_their_overrides():
    cfg = load_config(None, {"train.phases": [{"epochs": 2, "model.unfreeze_depth": 0, "optim.lr": 1e-3},
                                              {"epochs": 3, "model.unfreeze_depth": 3, "optim.lr": 1e-4,
                                               "data.aug_strength": 0.5}]})
    plan = phases(cfg)
    assert [(p.start, p.stop) for p in plan] == [(0, 2), (2, 5)]
    assert (plan[0].cfg.model.unfreeze_depth, plan[1].cfg.model.unfreeze_depth) == (0, 3)
    assert plan[1].cfg.optim.lr == 1e-4 and plan[1].cfg.data.aug_strength == 0.5
    assert phases(load_config(None, {"train.epochs": 4}))[0].stop == 4
    assert math.isclose(plan[0].cfg.optim.lr, 1e-3)


def test_stepper_carries_optimizer_moments_across_a_boundary(tiny_shards, tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{
        "train.epochs": 2, "train.phases": [{"epochs": 1, "model.unfreeze_depth": 1},
                                            {"epochs": 1, "model.unfreeze_depth": 2}]}))
    w = _worker(cfg, tiny_shards)
    w.begin_epoch(0)
    w.stepper.run_epoch(w.train_loader, 0, 1)
    first: Stepper = w.stepper
    head = next(w.model.head.parameters())
    moments = first.optimizer.state[head]["exp_avg"].clone()
    w.begin_epoch(1)
    assert w.stepper is not first and w.stepper.global_step == first.global_step
    assert torch.equal(w.stepper.optimizer.state[head]["exp_avg"], moments)  # the head kept its AdamW moments
    assert w.stepper.scheduler.last_epoch == first.global_step  # the schedule counts the run's steps
    newly = [p for p in w.model.stages[-2].params]
    params = dict(w.model.named_parameters())
    assert all(params[n].requires_grad for n in newly) and not any(params[n] in w.stepper.optimizer.state
                                                                     for n in newly)
