"""The README's generated parts match the code, and every config in configs/ loads."""

from pathlib import Path

import pytest

from distrain import readme
from distrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_blocks_match_the_code():
    text = (ROOT / "README.md").read_text()
    assert readme.render(text) == text, "README.md is out of date: run `make readme`"
    assert "| `optim.lr` |" in text and "| 0.5 | RandomResizedCrop" in text


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.name and cfg.data.shards


@pytest.mark.timeout(300)
def test_readme_generator_and_benchmarks_work_from_an_installed_wheel(tmp_path):
    """Built as a wheel and installed elsewhere (not this checkout on sys.path): the README check and the benchmark
    write-up run from the project folder all the same."""
    import subprocess
    import sys

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("distrain-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=120)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import distrain; print(distrain.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    check = subprocess.run([sys.executable, "-m", "distrain.readme", "--check"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    out = tmp_path / "B.md"
    bench = subprocess.run([sys.executable, "-m", "distrain.benchmarks", "all", "--skip", "shards", "data", "train",
                            "engines", "accuracy", "search", "--out", str(out)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert out.read_text().startswith("# Benchmarks")
