"""Using a fine-tuned model: `distrain eval`, `predict` and `export` on a model trained once for this module.

The model is a real 2-epoch Ray Train run on the learnable 3-class shards (conftest's `tiny_shards`), so eval can
be checked against what the run itself measured, and predictions against classes a model can actually learn.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_train_overrides, make_image_folder

from distrain.cli import main
from distrain.config import load_config
from distrain.evaluate import EvalError, evaluate_model
from distrain.modeldir import ModelDirError, load_model_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_shards, tmp_path_factory):
    from distrain.train import fit

    storage = tmp_path_factory.mktemp("use-runs")
    summary = fit(load_config(None, fast_train_overrides(tiny_shards, storage, name="use")))
    return summary


@pytest.fixture(scope="module")
def val_eval(trained, tiny_shards, tmp_path_factory):
    """In-process eval of model/ on the val split (the split the run validated on)."""
    out = tmp_path_factory.mktemp("eval-local")
    return evaluate_model(trained["model_dir"], str(tiny_shards), "val", out_dir=str(out), workers=1,
                          loader_workers=0, batch_size=8, progress=False)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def val_samples(shards: Path, folder: Path) -> dict[str, int]:
    """Write the val split's images as files named by sample key; returns key -> label."""
    from distrain.data.sources import iter_samples
    from distrain.shards.manifest import load_manifest

    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for url in load_manifest(str(shards)).shard_urls("val"):
        for s in iter_samples(url):
            (folder / f"{s['__key__']}.jpg").write_bytes(s["jpg"])
            labels[s["__key__"]] = int(s["cls"])
    return labels


# ------------------------------------------------------------------------------------------------ eval


@pytest.mark.timeout(300)
def test_eval_reproduces_the_runs_validation_of_the_saved_epoch(trained, val_eval, tiny_shards):
    meta = json.loads((Path(trained["model_dir"]) / "config.json").read_text())
    prov = meta["provenance"]
    epoch = next(h for h in trained["history"] if h["epoch"] == prov["epoch"])
    # model/ holds the best epoch: eval must give exactly the top-1 the run measured for that epoch
    assert val_eval["count"] == epoch["val_count"] == 21
    assert val_eval["top1"] == prov["val_top1"] == epoch["val_top1"]
    assert val_eval["loss"] == pytest.approx(epoch["val_loss"], abs=1e-4)
    assert val_eval["top5"] == epoch["val_top5"]

    conf = np.array(val_eval["confusion"])
    assert conf.shape == (3, 3) and conf.sum() == 21
    assert val_eval["top1"] == pytest.approx(np.trace(conf) / 21)
    for i, name in enumerate(val_eval["classes"]):
        pc = val_eval["per_class"][name]
        assert pc["support"] == conf[i].sum()
        assert pc["recall"] == pytest.approx(conf[i, i] / conf[i].sum())
        if conf[:, i].sum():
            assert pc["precision"] == pytest.approx(conf[i, i] / conf[:, i].sum())
    written = json.loads(Path(val_eval["metrics_json"]).read_text())
    assert written["top1"] == val_eval["top1"] and written["confusion"] == val_eval["confusion"]
    wrong = int(conf.sum() - np.trace(conf))
    assert len(written["worst"]) == min(wrong, 16)
    assert all(w["true"] != w["predicted"] for w in written["worst"])
    for png in (val_eval["confusion_png"], val_eval["errors_png"]):
        assert Path(png).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(300)
def test_eval_cli_data_as_split_folder_and_two_ray_workers_give_the_same_confusion(trained, val_eval, tiny_shards,
                                                                                  tmp_path, capsys):
    # SHARDS/val form, 2 workers through Ray: each its exact-once share, the driver sums the matrices
    code = main(["eval", "--model", trained["model_dir"], "--data", f"{tiny_shards}/val", "--workers", "2",
                 "--loader-workers", "0", "--batch-size", "4", "--out", str(tmp_path / "ray")])  # with progress bars
    out = capsys.readouterr().out
    assert code == 0
    figures = last_json(out)
    assert set(figures) >= {"top1", "top5", "count", "macro_f1", "metrics_json", "confusion_png", "errors_png"}
    assert figures["count"] == 21 and figures["top1"] == val_eval["top1"]
    metrics = json.loads(Path(figures["metrics_json"]).read_text())
    assert metrics["mode"] == "ray" and metrics["workers"] == 2
    assert metrics["confusion"] == val_eval["confusion"]
    assert sorted(s["count"] for s in metrics["shares"]) == [10, 11]  # 21 samples, each scored once

    # default output folder: <model>/../eval-<split>; in-process 3 shares one after another: same matrix again
    local = evaluate_model(trained["model_dir"], str(tiny_shards), "val", workers=3, local=True, loader_workers=0)
    assert local["confusion"] == val_eval["confusion"]
    assert Path(local["out_dir"]) == Path(trained["model_dir"]).parent / "eval-val"


@pytest.mark.timeout(120)
def test_eval_refuses_data_with_other_classes_and_unknown_splits(trained, tiny_shards, tmp_path, capsys):
    from distrain.shards.build import BuildOptions, build_shards

    make_image_folder(tmp_path / "four", num_classes=4, per_class=4, size=16, seed=3)
    build_shards(str(tmp_path / "four"), str(tmp_path / "shards4"), BuildOptions(shard_size=8, workers=1,
                                                                                 val_fraction=0.25))
    with pytest.raises(EvalError, match=r"classes of .* differ .* the model has 3 classes, the data 4"):
        evaluate_model(trained["model_dir"], str(tmp_path / "shards4"), "val", out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # failed before running

    code = main(["eval", "--model", trained["model_dir"], "--data", str(tiny_shards), "--split", "holdout",
                 "--local"])
    assert code == 2
    assert "no split 'holdout' (splits: train, val)" in capsys.readouterr().err
    with pytest.raises(EvalError, match="names split 'val' but --split says 'train'"):
        evaluate_model(trained["model_dir"], f"{tiny_shards}/val", "train")


@pytest.mark.timeout(60)
def test_bad_model_folders_fail_naming_what_is_wrong(trained, tmp_path, capsys):
    src = Path(trained["model_dir"])

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    no_weights = copy("no_weights")
    (no_weights / "weights.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"missing weights\.safetensors"):
        load_model_dir(str(no_weights))

    newer = copy("newer")
    meta = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**meta, "format": "distrain-model/2"}))
    with pytest.raises(ModelDirError, match="format 'distrain-model/2'; this distrain reads 'distrain-model/1'"):
        load_model_dir(str(newer))

    partial = copy("partial")
    pre = {k: v for k, v in meta["preprocess"].items() if k != "mean"}
    (partial / "config.json").write_text(json.dumps({**meta, "preprocess": pre}))
    with pytest.raises(ModelDirError, match=r"lacks 'preprocess\.mean'"):
        load_model_dir(str(partial))

    garbled = copy("garbled")
    (garbled / "config.json").write_text("{not json")
    code = main(["export", "--model", str(garbled), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "garbled/config.json is not valid JSON" in capsys.readouterr().err

    other = copy("other_classes")
    (other / "config.json").write_text(json.dumps({**meta, "classes": ["a", "b"], "num_classes": 2}))
    with pytest.raises(ModelDirError, match="does not fit mobilenet_v2 with 2 classes"):
        load_model_dir(str(other))


# --------------------------------------------------------------------------------------------- predict


@pytest.mark.timeout(120)
def test_predict_files_and_folders_gives_the_right_classes_and_reports_broken_files(trained, tmp_path, capsys):
    # new images of the same learnable classes, drawn with another seed than the training set
    fresh = make_image_folder(tmp_path / "fresh", num_classes=3, per_class=5, size=40, seed=11)
    (fresh / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (fresh / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    code = main(["predict", "--model", trained["model_dir"], str(fresh), str(tmp_path / "missing.png"),
                 "--top-k", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    figures = last_json(captured.out)
    assert figures["count"] == 17 and figures["classified"] == 15 and figures["errors"] == 2
    assert figures["ignored"] == 1  # notes.txt, counted
    assert "broken.jpg: cannot decode image" in captured.err and "missing.png: file not found" in captured.err

    import pyarrow.csv

    rows = pyarrow.csv.read_csv(out).to_pylist()
    assert len(rows) == 17
    good = [r for r in rows if not r["error"]]
    correct = sum(Path(r["path"]).parent.name == r["class_1"] for r in good)
    assert correct / len(good) >= 0.9, rows
    for r in good:
        assert 1.0 >= r["prob_1"] >= r["prob_2"] >= 0.0 and r["class_1"] != r["class_2"]
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["class_1"] in ("", None) and broken["prob_1"] is None


@pytest.mark.timeout(300)
def test_ray_data_shard_prediction_matches_local_prediction(trained, val_eval, tiny_shards, tmp_path, capsys):
    import pyarrow.parquet

    from distrain.predict import Predictor, list_images

    out = tmp_path / "preds.parquet"
    code = main(["predict", "--model", trained["model_dir"], "--shards", str(tiny_shards), "--split", "val",
                 "--out", str(out), "--top-k", "3", "--concurrency", "1", "--batch-size", "8", "--no-progress"])
    assert code == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["count"] == 21 and summary["errors"] == 0 and summary["labelled"] == 21
    # the same transform as eval: accuracy against the shards' labels is eval's top-1
    assert summary["top1"] == pytest.approx(val_eval["top1"])
    shard_rows = pyarrow.parquet.read_table(out).to_pylist()
    keys = [r["key"] for r in shard_rows]
    assert keys == sorted(keys)  # manifest order kept
    assert all(r["path"].startswith("class_") for r in shard_rows)  # the source path from the sample's .json

    labels = val_samples(Path(tiny_shards), tmp_path / "val-files")
    paths, _ = list_images([str(tmp_path / "val-files")])
    local = {Path(r["path"]).stem: r for r in Predictor.from_dir(trained["model_dir"]).predict_files(paths, 3)}
    assert set(local) == set(keys)
    classes = load_model_dir(trained["model_dir"]).classes
    for r in shard_rows:
        mine = local[r["key"]]
        assert [r[f"class_{i}"] for i in (1, 2, 3)] == mine["classes"]
        assert [r[f"prob_{i}"] for i in (1, 2, 3)] == pytest.approx(mine["probs"], abs=1e-6)
        assert r["label"] == classes[labels[r["key"]]]


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.timeout(240)
def test_all_export_formats_load_back_and_match_pytorch(trained, tiny_shards, tmp_path, capsys):
    import onnxruntime as ort
    from safetensors.torch import load_file

    from distrain.export import read_description
    from distrain.models import create_model
    from distrain.predict import Predictor, list_images

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
    model = create_model("mobilenet_v2", len(loaded.classes), weights="none", unfreeze_depth=0)
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
