"""`distrain shards index`: shards written by webdataset.ShardWriter and in img2dataset's layout, indexed in place and
read by the loader (and a 2-worker training run) as distrain's own; re-indexing reads only what changed; HTTP and
S3 (moto) sources; bad input named.

Real parts only: shards written by webdataset's own writers, real JPEGs, real servers on loopback.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distrain.cli import main as cli_main
from distrain.data import create_loader
from distrain.data.index import IndexError_, IndexOptions, index_shards
from tests.helpers import last_json

CLASSES = ["cat", "dog", "fox"]


def _jpeg(rng, label: int, size: int = 24) -> bytes:
    img = np.full((size, size, 3), [(200, 40, 40), (40, 200, 40), (40, 40, 200)][label], np.uint8)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG")
    return buf.getvalue()


def write_shardwriter(folder: Path, n: int = 30, maxcount: int = 7, seed: int = 0) -> Path:
    """webdataset.ShardWriter's layout: <key>.jpg + <key>.cls, shards of `maxcount` (the last one shorter), and
    one empty shard after them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for i in range(n):
            w.write({"__key__": f"s{i:05d}", "jpg": _jpeg(rng, i % 3), "cls": i % 3})
    last = len(list(folder.glob("shard-*.tar")))
    with wds.TarWriter(str(folder / f"shard-{last:06d}.tar")):
        pass  # an empty shard, as a writer that crashed at its start leaves
    return folder


def write_img2dataset(folder: Path, shards: int = 3, per: int = 8, seed: int = 1) -> Path:
    """img2dataset's output: NNNNN.tar with <key>.jpg, <key>.txt (a caption), <key>.json (metadata holding a string
    label), upper-case extensions in one shard, and the .parquet / _stats.json files it writes beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as w:
            for i in range(per):
                k = s * per + i
                ext = "JPG" if s == 1 else "jpg"
                meta = {"key": f"{s:05d}{i:04d}", "status": "success", "url": f"http://x/{k}.jpg",
                        "label": CLASSES[k % 3]}
                w.write({"__key__": f"{s:05d}{i:04d}", ext: _jpeg(rng, k % 3), "txt": f"a photo, number {k}",
                         "json": json.dumps(meta)})
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not a shard")
        (folder / f"{s:05d}_stats.json").write_text("{}")
    return folder


def test_shardwriter_shards_index_in_place_and_read_like_distrains_own(tmp_path):
    src = write_shardwriter(tmp_path / "wds")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    figures = index_shards({"train": str(src)}, str(tmp_path / "idx"), IndexOptions(val_shards=1, seed=3,
                                                                                    progress=False))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # nothing touched, nothing copied
    assert not list((tmp_path / "idx").glob("*.tar"))
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["classes"] == ["0", "1", "2"] and m["layout"]["label"] == "cls"
    sizes = sorted(s["num_samples"] for sp in m["splits"].values() for s in sp["shards"])
    assert sizes == [0, 2, 7, 7, 7, 7]
    assert sum(sizes) == 30 and figures["read"] == 6 and figures["reused"] == 0
    assert all(len(s["sha256"]) == 64 and s["url"].startswith(str(src)) for sp in m["splits"].values()
               for s in sp["shards"])
    assert sum(m["splits"]["train"]["class_counts"]) == m["splits"]["train"]["num_samples"]
    info = json.loads((tmp_path / "idx" / "_info.json").read_text())
    assert info["splits"]["val"]["num_samples"] == m["splits"]["val"]["num_samples"]
    # exact-once validation and equal train batches on 2 ranks, from the index's counts
    val = [k for r in (0, 1) for b in create_loader(str(tmp_path / "idx"), "val", train=False, rank=r,
                                                        world_size=2, batch_size=4, loader_workers=0, image_size=16)
           for k, v in zip(b.keys, b.valid) if v]
    assert sorted(val) == sorted(set(val)) and len(val) == m["splits"]["val"]["num_samples"]
    lens = [len(create_loader(str(tmp_path / "idx"), "train", rank=r, world_size=2, batch_size=4,
                              loader_workers=0, image_size=16)) for r in (0, 1)]
    assert lens[0] == lens[1] > 0


def test_img2dataset_layout_with_json_labels_and_names(tmp_path):
    src = write_img2dataset(tmp_path / "i2d")
    out = tmp_path / "idx"
    code = cli_main(["shards", "index", "--out", str(out), "--split", f"train={src}", "--val-fraction", "0.34",
                     "--label", "json:label", "-q"])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == CLASSES and m["layout"] == {"label": "json:label", "label_names": True, "image_key": ""}
    assert sum(s["num_samples"] for sp in m["splits"].values() for s in sp["shards"]) == 24
    assert len(m["splits"]["val"]["shards"]) == 1 and m["skipped"] == []  # .parquet/_stats.json are not shards
    # the loader maps names to indices as the manifest says: cat 0, dog 1, fox 2 (colours red, green, blue)
    for b in create_loader(str(out), "train", batch_size=4, loader_workers=0, image_size=16, aug_strength=0.0):
        means = b.images.float().mean((2, 3))
        assert (means.argmax(1) == b.labels).all()
        assert b.decode_errors == 0


def test_reindex_reads_only_new_or_changed_shards(tmp_path, capsys):
    src = write_shardwriter(tmp_path / "wds", n=21)
    out = str(tmp_path / "idx")
    first = index_shards({"train": str(src)}, out, IndexOptions(progress=False))
    assert first["read"] == 4
    rng = np.random.default_rng(9)
    with wds.TarWriter(str(src / "shard-000010.tar")) as w:  # the bucket grew by one shard
        for i in range(5):
            w.write({"__key__": f"new{i}", "jpg": _jpeg(rng, i % 3), "cls": i % 3})
    again = index_shards({"train": str(src)}, out, IndexOptions(progress=False))
    assert again["read"] == 1 and again["reused"] == 4
    assert again["samples"]["train"] == 26
    # a shard rewritten in place (new size and time) is read again; the verify pass agrees with the index
    code = cli_main(["shards", "inspect", out, "--verify", "-q"])
    assert code == 0 and last_json(capsys.readouterr().out)["verified"] is True
    shutil.copy(src / "shard-000001.tar", src / "shard-000000.tar")
    assert index_shards({"train": str(src)}, out, IndexOptions(progress=False))["read"] == 1


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.timeout(120)
def test_http_and_s3_sources(tmp_path, s3_server, capsys):
    import boto3

    src = write_shardwriter(tmp_path / "wds", n=40, maxcount=10)
    server, base = _serve(src)
    try:
        out = str(tmp_path / "http_idx")
        figures = index_shards({"train": base + "/shard-{000000..000003}.tar", "val": base + "/shard-000004.tar"},
                               out, IndexOptions(progress=False))
        assert figures["samples"] == {"train": 40, "val": 0}  # shard-000004 is the empty one
        keys = [k for b in create_loader(out, "train", train=False, batch_size=8, loader_workers=0,
                                         image_size=16) for k, v in zip(b.keys, b.valid) if v]
        assert len(keys) == 40 == len(set(keys))
    finally:
        server.shutdown()
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="bucket")
    for p in src.glob("*.tar"):
        s3.upload_file(str(p), "bucket", f"wds/{p.name}")
    out = str(tmp_path / "s3_idx")
    first = index_shards({"train": "s3://bucket/wds/"}, out, IndexOptions(val_shards=1, progress=False,
                                                                           workers=2))
    assert first["read"] == 5 and sum(first["samples"].values()) == 40
    again = index_shards({"train": "s3://bucket/wds/"}, out, IndexOptions(val_shards=1, progress=False))
    assert again["read"] == 0 and again["reused"] == 5  # ETags unchanged
    m = json.loads((tmp_path / "s3_idx" / "manifest.json").read_text())
    assert all(s["url"].startswith("s3://bucket/wds/") for sp in m["splits"].values() for s in sp["shards"])
    with capsys.disabled():
        print(f"\nindex throughput: http {figures['shards_per_s']} shards/s {figures['mb_per_s']} MB/s; "
              f"s3 {first['shards_per_s']} shards/s {first['mb_per_s']} MB/s")


def test_bad_input_is_named(tmp_path):
    src = write_shardwriter(tmp_path / "wds", n=14)
    with pytest.raises(IndexError_, match=r"--split train=.*nothing-here.*matches no shard"):
        index_shards({"train": str(tmp_path / "nothing-here")}, str(tmp_path / "i0"), IndexOptions(progress=False))
    with pytest.raises(IndexError_, match=r"no sample has a label \(json:species\)"):
        index_shards({"train": str(src)}, str(tmp_path / "i1"), IndexOptions(label="json:species", progress=False))
    names = write_img2dataset(tmp_path / "i2d", shards=2)
    with pytest.raises(IndexError_, match=r"label 'fox' is not in --classes \(cat, dog\)"):
        index_shards({"train": str(names)}, str(tmp_path / "i2"), IndexOptions(label="json:label",
                                                                               classes=["cat", "dog"],
                                                                               progress=False))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(mixed / "a.tar")) as w:
        w.write({"__key__": "x1", "jpg": _jpeg(rng, 0), "cls": "3"})
        w.write({"__key__": "x2", "jpg": _jpeg(rng, 1), "cls": "dog"})
    with pytest.raises(IndexError_, match=r"labels mix integers \(\[3\]\) and class names \(\['dog'\]\)"):
        index_shards({"train": str(mixed)}, str(tmp_path / "i3"), IndexOptions(progress=False))
    assert not (tmp_path / "i3" / "manifest.json").exists()  # nothing written on error


@pytest.mark.timeout(300)
def test_a_two_worker_run_trains_on_an_index(ray_cluster, tmp_path):
    """Training on shards distrain did not write: equal steps on both ranks, every val sample once."""
    from distrain.config import load_config
    from distrain.train import fit
    from tests.helpers import fast_train_overrides, learnable_image

    src = tmp_path / "wds"
    src.mkdir()
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(src / "part-%04d.tar"), maxcount=23, verbose=0) as w:
        for i in range(120):
            buf = io.BytesIO()
            learnable_image(i % 3, 32, rng).save(buf, "JPEG")
            w.write({"__key__": f"img{i:04d}", "jpg": buf.getvalue(), "label": CLASSES[i % 3]})
    # read by Ray tasks, as for thousands of shards on S3 (`--ray`)
    figures = index_shards({"train": str(src)}, str(tmp_path / "idx"), IndexOptions(val_shards=1, progress=False,
                                                                                    ray=True))
    assert figures["label"] == "label" and figures["label_names"] is True and figures["read"] == 6
    val_count = figures["samples"]["val"]
    cfg = load_config(None, fast_train_overrides(tmp_path / "idx", tmp_path / "runs", name="indexed",
                                                 **{"train.epochs": 1}))
    summary = fit(cfg)
    h = summary["history"][0]
    assert h["val_count"] == val_count and h["decode_errors"] == 0 and h["skipped_shards"] == []
    meta = json.loads((Path(summary["best_checkpoint"]) / "meta.json").read_text())
    assert meta["global_step"] == meta["data_position"]["batches_per_epoch"] > 0
    assert summary["replicas_in_sync"] is True and summary["best_val_top1"] > 0.5
