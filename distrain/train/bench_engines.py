"""Benchmark: the two data engines, loader and ray_data, on the same 2-worker Ray Train run; and ray_data's decode
throughput as the CPUs of a labelled data node grow, on a two-node local cluster.

Usage:
    distrain bench data --engine ray_data [--shards DIR] [--epochs 3] [--node-cpus 1 2] [--out BENCHMARKS.md]
    python -m distrain.train.bench_engines ...                                  (the same)

1. Engines: both runs come from one config (train/bench.py's bench_overrides: the same shards, model, batch, images,
   epochs) and differ only in data.engine (and the CPU split that engine needs: `loader` gives each worker 1 CPU
   and decodes in the training process; `ray_data` gives each worker 0.5 CPU and its decode tasks 1, so both use
   the machine's cores). Throughput is the runs' own images/s (training steps, all workers), of the epochs after the
   first (the first includes start-up). Goal on 2 cores: ray_data >= 0.8x loader, the engine's own overhead.
2. Data node: a ray.cluster_utils.Cluster of a head (no CPUs), a node labelled `distrain-role=data` with k CPUs and a
   training node; one consumer reads an epoch of the train split through the engine's Dataset (decode only on the
   data node), for each k in --node-cpus. What it shows: how decode throughput follows the data node's CPUs.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.8  # ray_data / loader images/s on the same run


def engines(shards: str, *, storage: str, workers: int = 2, epochs: int = 3, image_size: int = 64,
            train_limit: int = 4096, backbone: str = "mobilenet_v2", unfreeze_depth="all", log=print) -> dict:
    from distrain import runtime
    from distrain.config import load_config
    from distrain.train import fit
    from distrain.train.bench import bench_overrides

    runtime.connect()
    rows = {}
    for engine, cpus in (("loader", 1.0), ("ray_data", 0.5)):
        over = bench_overrides(shards, storage, workers, image_size, 64, epochs, backbone, unfreeze_depth,
                               train_limit, name=f"bench_engine_{engine}")
        cfg = load_config(None, {**over, "data.engine": engine, "scaling.cpus_per_worker": cpus})
        t0 = time.perf_counter()
        summary = fit(cfg, restart=True)
        rates = [h["images_per_s"] for h in summary["history"][1:]] or [summary["history"][0]["images_per_s"]]
        rows[engine] = {"images_per_s": round(sum(rates) / len(rates), 1), "epochs": epochs,
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "val_top1": round(summary["history"][-1]["val_top1"], 4)}
        log(f"  {engine}: {rows[engine]['images_per_s']:.0f} images/s (epochs 2-{epochs}), "
            f"val top-1 {rows[engine]['val_top1']:.4f}")
    ratio = rows["ray_data"]["images_per_s"] / max(1e-9, rows["loader"]["images_per_s"])
    return {"engines": rows, "ratio": round(ratio, 3), "target": TARGET, "met": ratio >= TARGET,
            "workers": workers, "image_size": image_size, "images_per_epoch": train_limit, "backbone": backbone}


# Run as `python -c NODE_RUN SHARDS CPUS IMAGES SIZE`: a two-node cluster, one epoch through the Dataset, JSON out.
NODE_RUN = """
import json, sys, time
import ray
from ray.cluster_utils import Cluster
from distrain.data import ray_data
from distrain.data.ray_loader import RayDataLoader
from distrain.data.sources import resolve_source

shards, cpus, images, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mem = 300 * 1024**2
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=mem))
cluster.add_node(num_cpus=cpus, object_store_memory=mem, labels={"distrain-role": "data"})
cluster.add_node(num_cpus=1, object_store_memory=mem)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
p = ray_data.IngestParams(train=True, image_size=size, crop_pct=0.875, strengths=(0.3,), limit=images,
                          batch_size=64, node_label="distrain-role=data", segment_samples=256, shuffle_buffer=0)
ds = ray_data.build_datasets(shards, "train", "train", p, p)["train"]
(split,) = ds.streaming_split(1, equal=True)
loader = RayDataLoader(split, p, ray_data.split_size(resolve_source(shards, "train"), images),
                                None, 0, 1, None)
rates = []
for epoch in range(2):
    t0, n = time.perf_counter(), 0
    for b in loader:
        n += len(b)
    rates.append(n / (time.perf_counter() - t0))
data_node = [x["NodeID"] for x in ray.nodes() if x.get("Labels", {}).get("distrain-role") == "data"]
print("RESULT " + json.dumps({"cpus": cpus, "images_per_s": round(max(rates), 1),
                              "only_data_node": list(loader.nodes) == data_node}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def data_node_scaling(cpus: list[float], images: int = 2048, image_size: int = 64, log=print) -> list:
    """Decode throughput by data-node CPUs, on ~500 px JPEG photos (data/bench.py's generated shards): decoding them
    costs far more than moving 64 px results, so the decode tasks, not the consumer, set the pace."""
    from distrain.data.bench import make_bench_shards

    out = []
    with tempfile.TemporaryDirectory(prefix="dbs", dir="/tmp") as shards:
        make_bench_shards(shards, num_images=images)
        alone = _decode_alone(shards, image_size)
        log(f"  the same decode in this process, one thread: {alone:.0f} images/s")
        for k in cpus:
            with tempfile.TemporaryDirectory(prefix="dbn", dir="/tmp") as tmp:
                env = {**os.environ, "RAY_TMPDIR": tmp}
                env.pop("RAY_ADDRESS", None)
                proc = subprocess.run([sys.executable, "-c", NODE_RUN, shards, str(k), str(images), str(image_size)],
                                      env=env, capture_output=True, text=True, timeout=900)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"two-node run with {k:g} data CPUs failed:\n{proc.stdout[-2000:]}"
                                   f"{proc.stderr[-2000:]}")
            row = json.loads(line[len("RESULT "):])
            log(f"  data node with {k:g} CPU(s): {row['images_per_s']:.0f} images/s decoded "
                f"({'only on the data node' if row['only_data_node'] else 'NOT only on the data node'})")
            out.append({**row, "decode_alone_per_core": round(alone, 1)})
    return out


def _decode_alone(shards: str, image_size: int) -> float:
    """Images/s of ImageTransform on one thread over the first 512 samples: the decode without Ray Data."""
    import numpy as np

    from distrain.data.decode import single_threaded
    from distrain.data.sources import iter_samples, resolve_source
    from distrain.data.transform import ImageTransform

    single_threaded()
    samples = [x["jpg"] for u in resolve_source(shards, "train").urls for x in iter_samples(u)][:512]
    t, rng = ImageTransform(image_size, 0.3, train=True), np.random.default_rng(0)
    t0 = time.perf_counter()
    for data in samples:
        t(data, "jpg", rng)
    return len(samples) / (time.perf_counter() - t0)


def markdown(r: dict) -> str:
    e = r["engines"]
    lines = ["## Data engines (`distrain bench data --engine ray_data`)\n",
             f"The same {r['workers']}-worker Ray Train run ({r['backbone']}, {r['image_size']} px, "
             f"{r['images_per_epoch']} images per epoch), training images/s of epochs 2 on, this machine "
             f"({os.cpu_count()} cores):\n",
             "| engine | images/s | val top-1 | wall s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['images_per_s']} | {v['val_top1']} | {v['wall_s']} |" for k, v in e.items()]
    verdict = "met" if r["met"] else "not met"
    lines.append(f"\nray_data / loader = **{r['ratio']}** (target >= {r['target']}: {verdict}).")
    if r.get("nodes"):
        lines += ["\nDecode on a labelled data node of a two-node local cluster (one consumer reading the train "
                  f"Dataset; {r['node_images']} ~500 px JPEG photos to {r['node_image_size']} px, strength 0.3, the "
                  "better of two epochs), by the data node's CPUs:\n",
                  "| data node CPUs | images/s | decode only on the data node |", "|---|---|---|"]
        lines += [f"| {n['cpus']:g} | {n['images_per_s']} | {n['only_data_node']} |" for n in r["nodes"]]
        a, b = r["nodes"][0], r["nodes"][-1]
        if b["cpus"] > a["cpus"]:
            lines.append(f"\n{b['cpus']:g} vs {a['cpus']:g} data CPUs: {b['images_per_s'] / a['images_per_s']:.2f}x "
                         f"the decode throughput (all nodes share this machine's {os.cpu_count()} cores). The same "
                         f"decode in one process on one thread: {a['decode_alone_per_core']:.0f} images/s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distrain bench data --engine ray_data", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["ray_data"], default="ray_data")
    parser.add_argument("--shards", default="data/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--node-cpus", type=float, nargs="*", default=[1, 2],
                        help="data-node CPU counts of the two-node measurement (none: skip it)")
    parser.add_argument("--storage", default="outputs/bench")
    parser.add_argument("--out", default=None, help="write (or replace) this section of a BENCHMARKS.md")
    args = parser.parse_args(argv)
    shards = str(Path(args.shards).absolute())
    result = engines(shards, storage=str(Path(args.storage).absolute()), epochs=args.epochs, train_limit=args.images,
                     image_size=args.image_size)
    if args.node_cpus:
        result.update(nodes=data_node_scaling(args.node_cpus), node_images=2048, node_image_size=64)
    section = markdown(result)
    print(section)
    if args.out:
        from distrain import storage

        storage.write_section(str(Path(args.out).absolute()), "engines", section)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
