"""`distrain bench gpu`: without CUDA it exits at once with a JSON line; with `--device cpu` the same code runs end
to end on this machine with Ray, W&B and webdataset unimportable (as on the GPU check machine)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

BLOCKED = "import sys\nfor m in ('ray', 'wandb', 'webdataset'): sys.modules[m] = None  # any import of them fails\n"


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_without_cuda_it_exits_non_zero_with_one_json_line(tmp_path):
    argv = ["bench", "gpu", "--out", str(tmp_path / "g.json")]
    out = _run(f"from distrain.cli import main\nsys.exit(main({argv!r}))")
    assert out.returncode == 3, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["cuda_available"] is False and "reason" in figures
    assert json.loads((tmp_path / "g.json").read_text()) == figures


def test_the_same_code_runs_on_a_cpu_without_ray(tmp_path):
    args = ["--device", "cpu", "--quick", "--images", "120", "--side", "96", "--steps", "3", "--warmup", "1",
            "--image-size", "48", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "g.json")]
    out = _run(f"from distrain.train.bench_gpu import main\nsys.exit(main({args!r}))")
    assert out.returncode == 0, out.stderr[-3000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "g.json").read_text()) == f
    assert f["targets"] is None  # the targets are for a GPU; a CPU run states none
    for name in ("resnet50_full", "frozen_mobilenet_v2"):
        row = f[name]
        for mode in ("synthetic", "cpu", "gpu"):
            assert row[mode]["images_per_s"] > 0 and row[mode]["steps"] == 3
        assert row["gpu_vs_cpu"] == round(row["gpu"]["images_per_s"] / row["cpu"]["images_per_s"], 3)
    assert f["frozen_mobilenet_v2"]["unfreeze_depth"] == 0 and f["resnet50_full"]["unfreeze_depth"] == "all"
    c = f["checks"]
    assert c["ddp_wrapped"] and c["all_reduce_ok"] and c["replicas_identical"] and c["off_loss_finite"]
    # its shards: ~4,000 by default; here 120 written by distrain's writer, the train split listed 8 times over
    m = json.loads((tmp_path / "work" / "shards" / "manifest.json").read_text())
    assert m["splits"]["train"]["num_samples"] == 8 * (120 - m["splits"]["val"]["num_samples"])
