"""data.engine=ray_data: equal steps and exact-once validation over uneven shards, damaged input counted, preflight
errors, a 2-worker Ray Train run against the loader engine's, and decode kept on a labelled node of a two-node cluster.

Real parts only: tar shards of real JPEGs (tests/data/test_loader.write_shards), the session's local Ray cluster,
Ray Data's own streaming split (the DataConfig Ray Train uses), real Train runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from distrain.data import ray_data
from distrain.data.ray_loader import RayDataLoader
from tests.data.test_loader import IMG, TRAIN_SIZES, VAL_SIZES, B, shard_keys, write_shards
from tests.helpers import ROOT, fast_train_overrides

CLASSES = ["c0", "c1", "c2"]


def _params(train: bool, **extra) -> ray_data.IngestParams:
    return ray_data.IngestParams(train=train, image_size=IMG, crop_pct=0.875, seed=1, strengths=(0.5,),
                                 batch_size=B, segment_samples=16, shuffle_buffer=20, wait_timeout=120, **extra)


def _consume(root: Path, world: int, epochs: tuple[int, ...], train_sizes: list[int], val_sizes: list[int]):
    """{rank: [per epoch: {'train': [keys per batch], 'val': [(key, valid)], 'loader': RayDataLoader}]} from
    `world` ranks (threads) reading their splits of the two Datasets, as Ray Train's workers do."""
    from distrain.train.control import create_control

    clock = create_control()
    pt, pv = _params(True), _params(False)
    datasets = ray_data.build_datasets(str(root), "train", "val", pt, pv, clock)
    splits = ray_data.ingest_config().configure(datasets, world, None, None)
    out: dict = {}
    errors: list = []

    def rank(r: int) -> None:
        try:
            rows = []
            for epoch in epochs:
                tl = RayDataLoader(splits[r]["train"], pt, sum(train_sizes), CLASSES, r, world, clock)
                tl.set_epoch(epoch)
                train = []
                for b in tl:
                    assert b.images.shape == (B, 3, IMG, IMG) and bool(b.valid.all())
                    train.append(list(b.keys))
                vl = RayDataLoader(splits[r]["val"], pv, sum(val_sizes), CLASSES, r, world, clock)
                val = [(k, bool(v)) for b in vl for k, v in zip(b.keys, b.valid.tolist())]
                rows.append({"train": train, "val": val, "loader": tl, "val_loader": vl})
            out[r] = rows
        except BaseException as e:
            errors.append((r, e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(out) == world, "a rank hung"
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("rd_shards"), {"train": TRAIN_SIZES, "val": VAL_SIZES})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_takes_the_same_full_batches_and_validation_is_exact_once(ray_cluster, shards, world):
    got = _consume(shards, world, (0, 1), TRAIN_SIZES, VAL_SIZES)
    steps = sum(TRAIN_SIZES) // (world * B)          # the loader engine's rule: floor(N / (W x B))
    expected_val = shard_keys(shards, "val")
    for e in (0, 1):
        counts = [len(got[r][e]["train"]) for r in range(world)]
        assert counts == [steps] * world
        assert all(len(got[r][e]["loader"]) == steps for r in range(world))
        trained = Counter(k for r in range(world) for batch in got[r][e]["train"] for k in batch)
        assert sum(trained.values()) == steps * world * B and max(trained.values()) == 1  # no sample twice
        scored = Counter(k for r in range(world) for k, ok in got[r][e]["val"] if ok)
        assert scored == expected_val                 # every validation sample exactly once, across ranks
        assert all(k == "" for r in range(world) for k, ok in got[r][e]["val"] if not ok)
    # a fresh shard order and shuffle each epoch
    assert [k for b in got[0][0]["train"] for k in b] != [k for b in got[0][1]["train"] for k in b]


@pytest.mark.timeout(300)
def test_damaged_samples_are_counted_and_training_rows_refilled(ray_cluster, tmp_path):
    train_sizes, val_sizes = [8, 16, 8], [6, 6]
    bad_train, bad_val = ("train01x0003", "train01x0011"), ("val00x0002",)
    root = write_shards(tmp_path, {"train": train_sizes, "val": val_sizes}, corrupt=bad_train + bad_val,
                        unlabeled=("train00x0005",))
    (tmp_path / "train/train-000002.tar").write_bytes(b"this is not a tar file" * 50)  # unreadable shard
    got = _consume(root, 1, (0,), train_sizes, val_sizes)[0][0]
    loader = got["loader"]
    assert len(got["train"]) == sum(train_sizes) // B == 4  # every row refilled: the full count of steps
    # (a refill may read a damaged sample a second time: each reading counts)
    assert loader.decode_errors == len(loader.dropped) >= 3
    assert {d.split("#")[1] for d in loader.dropped} == {*bad_train, "train00x0005"}
    assert list(loader.bad_shards) == [str(tmp_path / "train/train-000002.tar")]
    assert "unreadable" in loader.bad_shards[str(tmp_path / "train/train-000002.tar")]
    scored = [k for k, ok in got["val"] if ok]
    assert sorted(scored) == sorted(set(shard_keys(root, "val")) - set(bad_val))  # the rest exactly once
    assert got["val_loader"].decode_errors == 1


def test_preflight_names_a_missing_label_gpu_decode_and_cpus_the_workers_take(ray_cluster, tiny_shards, tmp_path):
    from distrain.config import ConfigError, load_config
    from distrain.train import TrainingError, fit

    base = fast_train_overrides(tiny_shards, tmp_path, name="rd_pre", **{"data.engine": "ray_data",
                                                                          "scaling.cpus_per_worker": 0.5})
    cases = [({"data.ray_data.node_label": "distrain-role=data"}, "no node of this cluster carries that label"),
             ({"data.decode": "gpu"}, "data.engine=ray_data decodes in Ray Data tasks on CPUs"),
             ({"scaling.cpus_per_worker": 1}, "the Train workers reserve 2 of the cluster's 2 CPUs")]
    for extra, message in cases:
        with pytest.raises(TrainingError, match=message):
            fit(load_config(None, {**base, **extra}))
        assert not list((tmp_path / "rd_pre").glob("checkpoint_*"))  # nothing started
    with pytest.raises(ConfigError, match="data.ray_data.node_label"):
        load_config(None, {**base, "data.ray_data.node_label": "no-equals-sign"})
    assert ray_data.check_api() is None  # the installed Ray has every API the engine uses (a newer one may not)


# A two-node cluster (head with no CPUs, a data node labelled distrain-role=data with 1 CPU, a training node with 2):
# run a 2-worker ray_data run with the label set, print where decode ran and where the workers were.
TWO_NODES = """
import json, os, sys
from ray.cluster_utils import Cluster
import ray
from distrain.config import load_config
from distrain.train import fit

mem = 250 * 1024**2
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=mem))
cluster.add_node(num_cpus=1, object_store_memory=mem, labels={"distrain-role": "data"})
cluster.add_node(num_cpus=2, object_store_memory=mem)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
nodes = {n["NodeID"]: n.get("Labels", {}).get("distrain-role", "") for n in ray.nodes() if n["Alive"]}
cfg = load_config(None, json.loads(sys.argv[1]))
summary = fit(cfg)
print("RESULT " + json.dumps({"nodes": nodes, "history": summary["history"]}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.timeout(400)
def test_two_worker_run_decodes_on_the_data_node_and_matches_the_loader_engine(trained_run, tmp_path):
    """The shared loader-engine run's config (trained_run: 2 workers, 2 epochs) on data.engine=ray_data, on a
    two-node cluster whose only labelled node decodes: the same steps, the same validation count, the same
    accuracy within noise, and every row decoded on the data node."""
    cfg, loader_summary = trained_run
    overrides = {**cfg.flat(), "data.engine": "ray_data", "data.ray_data.node_label": "distrain-role=data",
                 "scaling.cpus_per_worker": 1, "scaling.storage_path": str(tmp_path), "train.name": "rd_nodes"}
    temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "DISTRAIN_SHARED_STORAGE": str(tmp_path), "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", TWO_NODES, json.dumps(overrides)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=360)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    history, loader = result["history"], loader_summary["history"]
    assert [h["global_step"] for h in history] == [h["global_step"] for h in loader]  # equal steps, one rule
    assert [h["val_count"] for h in history] == [h["val_count"] for h in loader]  # exact once
    assert history[-1]["val_top1"] >= loader[-1]["val_top1"] - 0.1  # within 2 of the 21 images
    data_node = [n for n, role in result["nodes"].items() if role == "data"]
    assert len(data_node) == 1
    rows = history[0]["global_step"] * cfg.scaling.num_workers * cfg.data.batch_size
    for h in history:  # every training row decoded on the data node, none elsewhere
        assert h["decode_nodes"] == {data_node[0]: rows}
