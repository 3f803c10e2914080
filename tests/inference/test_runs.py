"""`distrain runs`: the runs and sweeps of a storage folder, from what their folders hold."""

from __future__ import annotations

import json

from distrain.cli import main
from distrain.inference.runs import list_runs


def test_runs_lists_a_finished_run_and_shows_its_paths(trained_run, tmp_path, capsys):
    cfg, summary = trained_run
    root = cfg.scaling.storage_path
    (tmp_path / "not_a_run").mkdir()
    rows = {r["name"]: r for r in list_runs(root)}
    row = rows["two_workers"]
    assert (row["kind"], row["status"], row["epochs"]) == ("run", "finished", "2/2")
    assert row["best_top1"] == summary["best_val_top1"] and row["backbone"] == "mobilenet_v2" and row["when"]
    assert main(["runs", "--storage", root]) == 0
    out = capsys.readouterr().out
    assert "two_workers" in out and "finished" in out.splitlines()[1] + out
    assert main(["runs", "show", "two_workers", "--storage", root]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["paths"]["model"].endswith("two_workers/model") and "config" in shown["paths"]
    assert shown["summary"]["best_epoch"] == summary["best_epoch"]
    assert main(["runs", "show", "nope", "--storage", root]) == 2
    assert "is not a distrain run or sweep" in capsys.readouterr().err
    assert main(["runs", "--storage", str(tmp_path / "missing")]) == 2
