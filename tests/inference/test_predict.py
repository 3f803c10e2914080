"""`distrain predict`: files, folders and broken files in-process; shards as a Ray Data job, the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distrain.cli import main
from distrain.models.folder import load_model_dir
from tests.helpers import last_json, make_image_folder
from tests.inference.conftest import val_samples


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

    from distrain.inference.predict import Predictor, list_images

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




@pytest.mark.timeout(120)
def test_files_decode_as_the_shards_builder_decodes(trained, tmp_path):
    """A phone photo (pixels stored sideways, EXIF orientation 6) gets the prediction of the same photo stored
    upright; transparent pixels count as white, as in shards; a decompression bomb is a per-file error."""
    from PIL import Image

    from distrain.inference.predict import Predictor

    p = Predictor.from_dir(trained["model_dir"], device="cpu")
    rng = np.random.default_rng(3)
    upright = make_image_folder(tmp_path / "src", num_classes=1, per_class=1, size=48, seed=5) / "class_0" / "0000.jpg"
    pixels = np.asarray(Image.open(upright).convert("RGB"))
    Image.fromarray(pixels).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the sensor's pixels are stored turned left
    Image.fromarray(np.rot90(pixels, 1).copy()).save(tmp_path / "phone.png", exif=exif)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    rgba[:8, :, 3] = 0  # a transparent band on top
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    white = pixels.copy()
    white[:8] = 255
    Image.fromarray(white).save(tmp_path / "white.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    rows = {Path(r["path"]).name: r for r in p.predict_files(
        [str(tmp_path / n) for n in ("upright.png", "phone.png", "alpha.png", "white.png")], top_k=3)}
    assert rows["phone.png"]["classes"] == rows["upright.png"]["classes"]
    assert rows["phone.png"]["probs"] == pytest.approx(rows["upright.png"]["probs"], abs=1e-6)
    assert rows["alpha.png"]["probs"] == pytest.approx(rows["white.png"]["probs"], abs=1e-6)
    import PIL.Image as PILImage

    limit = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 20  # an 8x8 image is 3x over: a "bomb" at this limit
    try:
        (bomb,) = p.predict_files([str(tmp_path / "small.png")])
    finally:
        PILImage.MAX_IMAGE_PIXELS = limit
    assert bomb["classes"] == [] and "decompression bomb" in bomb["error"]
