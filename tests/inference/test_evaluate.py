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

from distrain.cli import main
from distrain.inference.evaluate import EvalError, evaluate_model
from distrain.models.folder import ModelDirError, load_model_dir
from tests.helpers import last_json, make_image_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    (newer / "config.json").write_text(json.dumps({**meta, "format": "distrain-model/3"}))
    with pytest.raises(ModelDirError, match="format 'distrain-model/3'; this distrain reads 'distrain-model/1', "
                                            "'distrain-model/2'"):
        load_model_dir(str(newer))

    partial = copy("partial")
    pre = {k: v for k, v in meta["spec"]["preprocess"].items() if k != "mean"}
    (partial / "config.json").write_text(json.dumps({**meta, "spec": {**meta["spec"], "preprocess": pre}}))
    with pytest.raises(ModelDirError, match=r"lacks 'preprocess\.mean'"):
        load_model_dir(str(partial))

    garbled = copy("garbled")
    (garbled / "config.json").write_text("{not json")
    code = main(["export", "--model", str(garbled), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "garbled/config.json is not valid JSON" in capsys.readouterr().err

    other = copy("other_classes")
    (other / "config.json").write_text(json.dumps({**meta, "spec": {**meta["spec"], "classes": ["a", "b"]},
                                                    "classes": ["a", "b"], "num_classes": 2}))
    with pytest.raises(ModelDirError, match="does not fit mobilenet_v2 with 2 classes"):
        load_model_dir(str(other))
