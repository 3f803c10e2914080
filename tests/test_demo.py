"""`distrain demo --quick` end to end on the real Debian Fashion-MNIST files: every artefact its report names."""

import json
from pathlib import Path

import onnxruntime
import pytest

from distrain.demo import run_demo
from distrain.models.folder import load_model_dir
from tests.wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_quick_demo_produces_every_artefact_of_its_report(ray_cluster, tmp_path, capsys):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    report = run_demo(tmp_path, quick=True)
    out = capsys.readouterr().out

    # 1. shards, with the test split the final evaluation uses
    manifest = json.loads((tmp_path / "data/fashion-mnist-quick/manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"} and len(manifest["classes"]) == 10
    # 3. the sweep: a trial table with one row per trial
    rows = Path(report["trials_csv"]).read_text().strip().splitlines()
    assert len(rows) == 1 + 2
    assert set(report["best_params"]) == {"optim.lr", "model.unfreeze_depth", "data.aug_strength"}
    # 4. the final run: summary and a model folder that loads
    summary = json.loads((Path(report["run_dir"]) / "summary.json").read_text())
    assert summary["epochs"] == 1
    model = load_model_dir(report["model_dir"])
    assert len(model.classes) == 10
    # 5. evaluation on the whole test split (600 images in the quick subset), better than chance (0.1)
    metrics = json.loads(Path(report["metrics_json"]).read_text())
    assert report["test_images"] == manifest["splits"]["test"]["num_samples"] == 600
    assert metrics["top1"] == report["test_top1"] > 0.3
    for png in (report["confusion_png"], report["errors_png"]):
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 6. the ONNX export runs and was checked against PyTorch
    session = onnxruntime.InferenceSession(report["onnx"])
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]
    assert report["onnx_max_abs_diff"] < 1e-3
    # W&B: one offline run per trial, the sweep's summary run and the final run, all in one sync command
    runs = report["wandb_runs"]
    assert (len(runs["trials"]), len(runs["sweep"]), len(runs["final"])) == (2, 1, 1)
    sync = next(line for line in Path(report["report"]).read_text().splitlines() if "wandb sync" in line).split()
    assert sync[2:] == runs["trials"] + runs["sweep"] + runs["final"]
    assert all(Path(p).is_dir() for p in sync[2:])
    run_files = sorted((Path(report["run_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = read_offline_run(run_files[0], wait_s=20).history
    assert any("val/top1" in row for row in history)
    # 7. the report, printed and written
    text = Path(report["report"]).read_text()
    assert f"{report['test_top1']:.4f}" in text and report["onnx"] in text
    assert "=== [7/7] report" in out

    # A second run reuses everything: no shards rebuilt, the sweep and the run already finished.
    again = run_demo(tmp_path, quick=True)
    assert again["test_top1"] == report["test_top1"] and again["model_dir"] == report["model_dir"]
    assert "reusing" in capsys.readouterr().out
