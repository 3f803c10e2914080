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
