"""Fixtures of the inference tests: the shared trained run's summary, and its val split as image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrain.inference.evaluate import evaluate_model


@pytest.fixture(scope="module")
def trained(trained_run):
    """The shared 2-worker run (tests/conftest.py): its summary."""
    return trained_run[1]


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


@pytest.fixture(scope="module")
def val_eval(trained, tiny_shards, tmp_path_factory):
    """In-process eval of model/ on the val split (the split the run validated on)."""
    out = tmp_path_factory.mktemp("eval-local")
    return evaluate_model(trained["model_dir"], str(tiny_shards), "val", out_dir=str(out), workers=1,
                          loader_workers=0, batch_size=8, progress=False)
