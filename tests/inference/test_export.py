"""`distrain export`: TorchScript, ONNX and safetensors files load back without distrain and match PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distrain.cli import main
from distrain.models.folder import load_model_dir
from tests.helpers import last_json
from tests.inference.conftest import val_samples


@pytest.mark.timeout(240)
def test_all_export_formats_load_back_and_match_pytorch(trained, tiny_shards, tmp_path, capsys):
    import onnxruntime as ort
    from safetensors.torch import load_file

    from distrain.inference.export import read_description
    from distrain.inference.predict import Predictor, list_images
    from distrain.models import ModelSpec, create_model

    loaded = load_model_dir(trained["model_dir"])
    predictor = Predictor(loaded, "cpu")
    val_samples(Path(tiny_shards), tmp_path / "val")
    paths, _ = list_images([str(tmp_path / "val")])
    crops = np.stack([predictor.prepare(Path(p).read_bytes(), "jpg") for p in paths])   # real images, (21, S, S, 3)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()                   # uint8 NCHW
    pre = loaded.preprocess
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    normalized = (images.float() / 255 - mean) / std
    with torch.no_grad():
        reference = loaded.model(normalized).numpy()
    assert (reference.argmax(1) == predictor.probabilities(crops).argmax(1)).all()

    results = {}
    for fmt in ("torchscript", "onnx", "safetensors"):
        out = tmp_path / f"model.{fmt}"
        code = main(["export", "--model", trained["model_dir"], "--format", fmt, "--out", str(out)])
        assert code == 0
        results[fmt] = r = last_json(capsys.readouterr().out)
        assert r["format"] == fmt and r["out"] == str(out) and r["bytes"] == out.stat().st_size > 0
        assert r["max_abs_diff"] < 1e-4
        assert read_description(fmt, str(out))["classes"] == loaded.classes

    # load each back without distrain's helpers and run the 21 real images (batch size not used at export)
    ts = torch.jit.load(str(tmp_path / "model.torchscript"))
    with torch.no_grad():
        got_ts = ts(images).numpy()  # uint8 in: normalization inside
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
    got_onnx = session.run(None, {"images": images.numpy()})[0]
    model = create_model(ModelSpec.from_dict(read_description("safetensors", str(tmp_path / "model.safetensors"))[
        "spec"]).replace(weights="none"))
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        got_st = model.eval()(normalized).numpy()  # plain model: normalized input
    for got in (got_ts, got_onnx, got_st):
        assert got.shape == reference.shape
        assert np.abs(got - reference).max() < 1e-4
    assert results["torchscript"]["normalization"] == "included" == results["onnx"]["normalization"]
    assert results["safetensors"]["normalization"] == "not included"

    # float 0-1 input variant
    code = main(["export", "--model", trained["model_dir"], "--format", "onnx", "--input", "float", "--out",
                 str(tmp_path / "float.onnx")])
    assert code == 0 and last_json(capsys.readouterr().out)["input"].startswith("float32 0-1")
    session = ort.InferenceSession(str(tmp_path / "float.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": (images.float() / 255).numpy()})[0]
    assert np.abs(got - reference).max() < 1e-4
