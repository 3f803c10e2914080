"""Distributed fine-tuning under Ray Train on a real local cluster (CPU, gloo): results, checkpoints, resume,
preflight.

Each Ray Train run costs ~15-30 s here (worker start-up dominates), so the runs are few and each checks a lot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distrain.config import load_config
from distrain.models.folder import load_model_dir
from distrain.train import TrainingError, fit, preflight
from tests.helpers import fast_train_overrides, make_image_folder


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


@pytest.mark.timeout(300)
def test_two_workers_report_every_epoch_and_learn(trained):
    cfg, summary = trained
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        for key in ("train_loss", "lr", "images_per_s", "val_loss", "val_top1", "val_top5", "val_count"):
            assert key in h and h[key] == h[key]  # present and not NaN
        assert h["val_count"] == load_manifest_count(cfg, "val")  # exact-once validation, all-reduced
        assert h["phase"] == 1 and h["trainable_params"] > 0
    assert summary["replicas_in_sync"] is True  # DDP replicas hold identical parameters at the end
    assert summary["best_val_top1"] >= 0.8  # 3 learnable classes: chance is 0.33
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2)

    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["best_val_top1"] == summary["best_val_top1"]
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config, saved beside the run
    assert Path(summary["best_checkpoint"]).is_dir()
    marker = json.loads((run_dir / ".distrain.json").read_text())  # distrain made this folder (--restart checks)
    assert marker["kind"] == "run" and marker["name"] == "two_workers"
    assert not (run_dir / ".distrain.lock").exists()  # released when the run ended


def load_manifest_count(cfg, split):
    from distrain.shards.manifest import load_manifest

    return load_manifest(cfg.data.shards).num_samples(split)


@pytest.mark.timeout(120)
def test_checkpoint_holds_trainable_weights_and_model_dir_is_self_contained(trained):
    _cfg, summary = trained
    ckpt = Path(summary["best_checkpoint"])
    meta = json.loads((ckpt / "meta.json").read_text())
    weights = torch.load(ckpt / "weights.pt", weights_only=True)
    model = load_model_dir(summary["model_dir"])
    full = model.model.state_dict()
    # The frozen part is named by its source, not copied: far fewer tensors than the whole model.
    assert meta["frozen_included"] is False and meta["frozen_source"]["backbone"] == "mobilenet_v2"
    assert 0 < len(weights) < len(full) // 2
    assert all(k in full for k in weights)
    assert all(torch.equal(full[k], v) for k, v in weights.items())
    assert model.classes == meta["classes"] and len(model.classes) == 3
    assert model.preprocess["image_size"] == 32
    assert meta["spec"]["backbone"] == "mobilenet_v2" and meta["spec"]["classes"] == meta["classes"]
    assert model.spec.to_dict() == {**meta["spec"], "unfreeze_depth": model.spec.unfreeze_depth}
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler"} <= set(state)
    assert meta["data_position"]["epoch"] == meta["epoch"]


@pytest.mark.timeout(400)
def test_nan_stops_with_step_and_checkpoint_then_rerun_resumes_with_optimizer_state(ray_cluster, tiny_shards,
                                                                                     tmp_path):
    # Epoch 2 runs at an absurd learning rate: its weights overflow and the loss turns non-finite (no hooks).
    phases = [{"epochs": 1}, {"epochs": 1, "optim.lr": 1e38}]
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="resume", **{"train.phases": phases}))
    with pytest.raises(TrainingError) as err:
        fit(cfg)
    message = str(err.value)
    assert "non-finite" in message and "epoch 2" in message
    assert "checkpoint_epoch_0001" in message  # the last good checkpoint is named
    run_dir = tmp_path / "resume"
    assert (run_dir / "checkpoint_epoch_0001").is_dir() and not (run_dir / "checkpoint_epoch_0002").exists()
    steps_epoch1 = json.loads((run_dir / "checkpoint_epoch_0001" / "meta.json").read_text())["global_step"]

    # Running again with a sane rate for epoch 2 continues at epoch 2 with the saved optimizer state.
    fixed = cfg.replace({"train.phases.1.optim.lr": 0.003})
    summary = fit(fixed)
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    last = run_dir / "checkpoint_epoch_0002"
    meta = json.loads((last / "meta.json").read_text())
    state = torch.load(last / "train_state.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    # AdamW counts its own steps: restored state means epoch 1's steps are included.
    assert adam_steps == {meta["global_step"]} and meta["global_step"] == 2 * steps_epoch1
    assert state["scheduler"]["last_epoch"] == meta["global_step"]


# ------------------------------------------------------------------ preflight: fails before workers start


def test_preflight_missing_shards(tmp_path):
    cfg = load_config(None, {"data.shards": str(tmp_path / "nope"), "scaling.storage_path": str(tmp_path)})
    with pytest.raises(TrainingError, match=r"no shards manifest at .*nope"):
        preflight(cfg, {"nodes": 1, "CPU": 2})


def test_preflight_too_few_samples_for_world_size(tiny_shards, tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{"data.batch_size": 64,
                                                                           "scaling.num_workers": 3}))
    with pytest.raises(TrainingError, match=r"samples"):
        preflight(cfg, {"nodes": 1, "CPU": 3})


def test_preflight_class_count_differs_from_checkpoint(trained, tmp_path):
    cfg, _summary = trained
    make_image_folder(tmp_path / "four", num_classes=4, per_class=20, size=24)
    from distrain.shards.build import BuildOptions, build_shards

    build_shards(str(tmp_path / "four"), str(tmp_path / "four_shards"), BuildOptions(workers=1))
    other = cfg.replace({"data.shards": str(tmp_path / "four_shards")})
    with pytest.raises(TrainingError, match=r"3 classes .* has 4.*--restart"):
        preflight(other, {"nodes": 1, "CPU": 2})
    preflight(other, {"nodes": 1, "CPU": 2}, restart=True)  # starting over is fine


def test_preflight_storage_not_writable(tiny_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = load_config(None, fast_train_overrides(tiny_shards, blocker / "sub"))
    with pytest.raises(TrainingError, match=r"cannot write to .*file/sub"):
        preflight(cfg, {"nodes": 1, "CPU": 2})


def test_preflight_node_local_storage_on_multi_node_cluster(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTRAIN_SHARED_STORAGE", raising=False)
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path))
    with pytest.raises(TrainingError, match=r"node-local .* 2 nodes"):
        preflight(cfg, {"nodes": 2, "CPU": 4})


def test_preflight_more_cpus_than_the_local_cluster_has(tiny_shards, tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{"data.loader_workers": 2}))
    with pytest.raises(TrainingError, match=r"2 workers × 3 CPUs = 6 CPUs, but this cluster has 2"):
        preflight(cfg, {"nodes": 1, "CPU": 2})


def test_preflight_gpu_decode_without_gpus_names_data_decode(tiny_shards, tmp_path):
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{"data.decode": "gpu"}))
    with pytest.raises(TrainingError, match=r"data.decode=gpu .* get none \(scaling.use_gpu=auto, cluster GPUs: 0\)"):
        preflight(cfg, {"nodes": 1, "CPU": 2})
    # auto resolves to the CPU pipeline there and passes
    preflight(cfg.replace({"data.decode": "auto"}), {"nodes": 1, "CPU": 2})


@pytest.mark.parametrize("override,message", [
    ({"model.backbone": "resnet5O"}, r"model.backbone=resnet5O: unknown backbone 'resnet5O'"),
    ({"model.unfreeze_depth": 12}, r"unfreeze_depth 12 is out of range for mobilenet_v2, which has 9 stages"),
    ({"train.epochs": 2, "train.phases": [{"epochs": 1}, {"epochs": 1, "model.unfreeze_depth": 40}]},
     r"train.phases\[1\] \(phase 2\): unfreeze_depth: unfreeze_depth 40 is out of range"),
    ({"model.weights": "/no/such/weights.pth"}, r"model.weights=/no/such/weights.pth: weights file not found"),
    ({"model.head_pool": "flatten"}, r"head_pool=flatten is not supported for torchvision:mobilenet_v2"),
])
def test_preflight_builds_the_model_skeleton_on_the_driver(tiny_shards, tmp_path, override, message):
    """A bad backbone, depth, weights file or head fails on the driver in seconds, before any worker starts."""
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **override))
    with pytest.raises(TrainingError, match=message):
        preflight(cfg, {"nodes": 1, "CPU": 2})


def test_preflight_hub_weights_offline_fail_fast(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRAIN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, **{"model.backbone": "torchvision:resnet18",
                                                                           "model.weights": "default"}))
    with pytest.raises(TrainingError, match=r"must be downloaded .* offline mode is set"):
        preflight(cfg, {"nodes": 1, "CPU": 2})


@pytest.mark.timeout(300)
def test_the_seed_vgg16_recipe_runs_offline_in_two_phases(ray_cluster, tiny_shards, tmp_path):
    """configs/seed_vgg16.yaml as a user runs it offline (model.weights=none), shortened to 1 + 1 epochs: head
    only, then block5 too; the phases show in the history and on W&B's step axis."""
    from distrain.tracking import offline_runs
    from tests.helpers import ROOT
    from tests.wandb_offline import read_offline_run

    cfg = load_config(str(ROOT / "configs" / "seed_vgg16.yaml"), {
        "data.shards": str(tiny_shards), "data.image_size": 32, "data.batch_size": 8, "data.loader_workers": 0,
        "model.weights": "none", "scaling.storage_path": str(tmp_path), "wandb.mode": "offline",
        "train.epochs": 2, "train.log_every": 100,
        "train.phases": [{"epochs": 1, "model.unfreeze_depth": 0, "optim.lr": 1e-3},
                         {"epochs": 1, "model.unfreeze_depth": 1, "optim.lr": 1e-4}]})
    assert cfg.data.affine.rotation == 40 and cfg.model.vgg_top == "drop" and cfg.model.head_pool == "flatten"
    summary = fit(cfg)
    h = summary["history"]
    assert [e["phase"] for e in h] == [1, 2]
    head = 512 * 256 + 256 + 256 * 3 + 3  # Flatten of block5's 1x1x512 map at 32 px → 256 → 3 classes
    assert h[0]["trainable_params"] == head and h[1]["trainable_params"] == head + 7_079_424
    assert summary["replicas_in_sync"] is True
    wb = read_offline_run(offline_runs(Path(summary["run_dir"]) / "wandb")[0], wait_s=20)
    marks = [r for r in wb.history if "phase/index" in r]
    assert [(m["phase/index"], m["phase/unfreeze_depth"]) for m in marks] == [(1, 0), (2, 1)]
