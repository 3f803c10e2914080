"""data.engine=ray_data: the shards as Ray Datasets, decoded and augmented in Ray tasks, streamed into Train workers.

Usage (driver, train/run.py; workers, train/loop.py):
    datasets = build_datasets(manifest, 'train', 'val', train_params, val_params, clock)  # lazy Datasets
    TorchTrainer(..., datasets=datasets, dataset_config=ingest_config())
    make_loader = ray_loader.shard_loaders(ingest, clock, rank, world)   # the consuming side: ray_loader.py

Why: with the `loader` engine each Train worker decodes on its own node, so a GPU node's few CPU cores cap the input
pipeline. Here the decode runs in Ray Data tasks, which Ray places on any node with free CPUs, or only on nodes
carrying `data.ray_data.node_label` (cheap CPU-only nodes; the Train workers are then kept off them).

The pipeline, per epoch (Ray Data re-executes a Dataset each time a worker starts iterating its split):
- read (`ShardSegments`, a Datasource): the epoch's shard order is plan.shard_order(seed, epoch), the same rule as
  the loader engine; each shard is cut into segments of <= `segment_samples` samples and each segment is one read
  task and one block, so a few large shards still spread over many tasks. distrain's own tar reader (sources.py)
  reads the bytes, with the same read timeout and remote retries; nothing is decoded by PIL or pandas.
- decode (`decode_batch`, map_batches over whole blocks, fused with the read into one task): ImageTransform with the
  epoch's strength (phases may change it), simplejpeg + OpenCV, uint8 NHWC out; normalization and channels_last
  happen on the training device (BatchToDevice), as with the loader. Every sample's draws come from a generator
  seeded by (seed, epoch, shard, index), so an epoch is reproducible whichever task or node decodes it.
- split (`IngestConfig`): train with `streaming_split(W, equal=True)`, so every rank receives floor(N / W) rows and
  takes floor(N / (W * B)) full batches: the loader engine's rule, exactly. Validation with `equal=False`: every
  row goes to exactly one rank; ranks may get different counts, which is safe because validation has no collective
  per batch (distrain.validation sums the meters once), so each sample is scored exactly once.
- consume (`ray_loader.RayDataLoader`): iter_batches with `prefetch_batches`, a local shuffle buffer seeded by
  (seed, epoch, rank), and a bound on every wait for a batch (a stalled pipeline fails the epoch in one line).

Equal steps need equal rows, so the decode never drops a training row: an undecodable sample is counted and named,
and its row is refilled with another sample of the same segment (fresh draws); a shard that cannot be read is named
and its rows refilled from the epoch's next readable shards, as the loader engine refills. In validation an
undecodable or unreadable sample becomes a padding row (valid=False), counted, so exact-once holds over what reads.
A decode task that fails (a node lost) is retried by Ray Data.

Which epoch a Dataset execution is: the ranks say. Rank 0 posts its epoch to the run's control actor before it
starts iterating (a `clock`: `set_data_epoch` / `data_epoch`), and Ray Data's split coordinator starts an execution
only once every rank has asked for it, so the read side always sees the epoch the ranks are in, after a resume or a
worker-group restart too; every row carries its epoch and the consumer checks it.

Placement and backpressure: read/decode tasks reserve `cpus_per_task` CPUs each, with `label_selector` when a node
label is set. Locality: Train's `enable_shard_locality` (on) prefers blocks made on a worker's own node, which only
matters when decode and training share nodes. Backpressure is Ray Data's streaming executor's own (a per-operator
object-store budget, so decode never runs more than a few blocks ahead of the consumers) plus the consumers'
`prefetch_batches`; no extra knob is added.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import numpy as np

from distrain.data.dataset import PAD_LABEL, ShardStream
from distrain.data.decode import DecodeError
from distrain.data.plan import Segment, shard_order, stratified_limit
from distrain.data.sources import DataError, ShardSet

CLOCK_TIMEOUT_S = 10  # bound of a call to the clock (the run's control actor)


@dataclass(frozen=True)
class IngestParams:
    """What the read and decode tasks need to know of a split (picklable; built on the driver from the config)."""

    train: bool
    image_size: int
    crop_pct: float
    seed: int = 0
    limit: int = 0
    strengths: tuple[float, ...] = (0.0,)  # data.aug_strength of epoch e = strengths[min(e, len - 1)] (phases)
    affine: object = None                  # augment.Affine (train only)
    segment_samples: int = 256
    cpus_per_task: float = 1.0
    node_label: str = ""                   # "key=value": tasks only on nodes with that label
    storage_options: dict | None = None
    read_timeout: float | None = None
    read_retries: int = 0
    batch_size: int = 64
    shuffle_buffer: int = 1000
    prefetch_batches: int = 2
    wait_timeout: float = 300.0            # seconds a consumer waits for a batch before the epoch fails

    def strength(self, epoch: int) -> float:
        return self.strengths[min(epoch, len(self.strengths) - 1)] if self.train else 0.0

    def remote_args(self) -> dict:
        args: dict = {"num_cpus": self.cpus_per_task}
        if self.node_label:
            args["label_selector"] = dict([parse_label(self.node_label)])
        return args


def parse_label(text: str) -> tuple[str, str]:
    """'key=value' → (key, value); a ValueError naming the text otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ValueError(f"data.ray_data.node_label must be key=value (a Ray node label), got {text!r}")
    return key.strip(), value.strip()


def params_from_config(cfg, *, train: bool, image_size: int, crop_pct: float, strengths: list[float]) -> IngestParams:
    """IngestParams for the train or val split of `cfg` (the one place the config's data section meets this engine)."""
    from distrain.data.augment import Affine

    d, r = cfg.data, cfg.data.ray_data
    return IngestParams(train=train, image_size=image_size, crop_pct=crop_pct, seed=cfg.train.seed,
                        limit=d.train_limit if train else d.val_limit, strengths=tuple(strengths),
                        affine=Affine.from_config(d.affine) if train else None, segment_samples=r.segment_samples,
                        cpus_per_task=r.cpus_per_task, node_label=r.node_label, read_timeout=d.read_timeout_s,
                        read_retries=d.read_retries, batch_size=d.batch_size, shuffle_buffer=d.shuffle_buffer,
                        prefetch_batches=r.prefetch_batches, wait_timeout=max(300.0, 3 * d.read_timeout_s))


# ------------------------------------------------------------------------------------------------ read


def _segments(sizes: list[int], order: list[int], per: int) -> list[Segment]:
    out = []
    for shard in order:
        for start in range(0, sizes[shard], per):
            out.append(Segment(shard, start, min(sizes[shard], start + per)))
    return out


def _stream(shards: ShardSet, p: IngestParams) -> ShardStream:
    """The loader engine's sample reader (labels, image keys, bounded and retried reads) for one task."""
    return ShardStream(shards, train=False, batch_size=1, image_size=p.image_size, crop_pct=p.crop_pct,
                       num_classes=len(shards.classes) if shards.classes else None,
                       storage_options=p.storage_options, read_timeout=p.read_timeout, read_retries=p.read_retries)


def read_segment(shards: ShardSet, p: IngestParams, epoch: int, seg: Segment, order: list[int],
                 sizes: list[int]) -> dict:
    """One block: the segment's samples as columns (bytes still encoded). Train: exactly seg's row count, an unreadable
    shard's rows refilled from the epoch's next shards; val: unreadable samples as one padding row that counts them."""
    stream = _stream(shards, p)
    want = seg.stop - seg.start
    failed: dict[int, str] = {}
    rows = list(stream._segment(seg, failed))
    bad = [f"{shards.urls[i]}\t{e}" for i, e in failed.items()]
    if p.train and len(rows) < want:
        at = order.index(seg.shard)
        for other in order[at + 1:] + order[:at]:
            if len(rows) >= want:
                break
            if other in failed or sizes[other] == 0:
                continue
            rows += list(stream._segment(Segment(other, 0, min(sizes[other], want - len(rows))), failed))
            bad = [f"{shards.urls[i]}\t{e}" for i, e in failed.items()]
        if len(rows) < want:
            raise DataError(f"no readable shard left to refill {shards.urls[seg.shard]} samples {seg.start}-"
                            f"{seg.stop}: " + "; ".join(b.replace("\t", ": ") for b in bad[:3]))
    cols: dict[str, list] = {k: [] for k in ("key", "url", "data", "ext", "label", "shard", "index", "valid",
                                             "bad", "unreadable")}
    url_index = {u: i for i, u in enumerate(shards.urls)}

    def add(key, url, data, ext, label, shard, index, valid, note="", unreadable=0):
        for k, v in zip(cols, (key, url, data, ext, label, shard, index, valid, note, unreadable)):
            cols[k].append(v)

    for sample in rows:
        label, found = stream._label(sample), stream._image(sample)
        ok = label is not None and found is not None
        add(sample["__key__"], sample["__url__"], found[0] if ok else b"", found[1] if ok else "",
            label if ok else PAD_LABEL, url_index[sample["__url__"]], int(sample["__index__"]), True)
    if not p.train and len(rows) < want:  # validation: what could not be read is counted, not invented
        add("", shards.urls[seg.shard], b"", "", PAD_LABEL, seg.shard, -1, False, unreadable=want - len(rows))
    if bad and cols["key"]:
        cols["bad"][0] = "\n".join(bad)
    cols["epoch"] = [epoch] * len(cols["key"])
    return cols


def _block(cols: dict):
    import pyarrow as pa

    types = {"data": pa.binary(), "label": pa.int64(), "shard": pa.int64(), "index": pa.int64(),
             "valid": pa.bool_(), "unreadable": pa.int64(), "epoch": pa.int64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardSegments(Datasource):
        """The split's shards as read tasks of one segment each, in the epoch's shard order (see the module doc)."""

        def __init__(self, shards: ShardSet, p: IngestParams, clock):
            super().__init__()
            self.shards, self.p, self.clock = shards, p, clock
            self.sizes = stratified_limit(list(shards.sizes), p.limit)

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list:
            import ray

            epoch = 0
            if self.p.train and self.clock is not None:
                epoch = int(ray.get(self.clock.data_epoch.remote(), timeout=CLOCK_TIMEOUT_S))
            order, _ = shard_order(len(self.sizes), sum(self.sizes), self.p.seed, epoch, shuffle=self.p.train)
            tasks = []
            for seg in _segments(self.sizes, order, self.p.segment_samples):
                n = seg.stop - seg.start
                read = functools.partial(_read_block, self.shards, self.p, epoch, seg, order, self.sizes)
                meta = BlockMetadata(num_rows=n, size_bytes=None, input_files=[self.shards.urls[seg.shard]],
                                     exec_stats=None)
                tasks.append(ReadTask(read, meta))
            return tasks

    return ShardSegments


def _read_block(shards, p, epoch, seg, order, sizes):
    return [_block(read_segment(shards, p, epoch, seg, order, sizes))]


# ------------------------------------------------------------------------------------------------ decode


@functools.lru_cache(maxsize=16)
def _transform(size: int, strength: float, train: bool, crop_pct: float, affine):
    from distrain.data.decode import single_threaded
    from distrain.data.transform import ImageTransform

    single_threaded()  # one thread per task: tasks are the parallelism
    return ImageTransform(size, strength, train=train, crop_pct=crop_pct, affine=affine)


def decode_batch(batch: dict, p: IngestParams) -> dict:
    """A block of encoded samples → uint8 (n, S, S, 3) images. Train: an undecodable row takes another sample of the
    block (fresh draws), so the row count holds; val: it becomes padding (valid=False). Both are counted."""
    import ray

    n, S = len(batch["key"]), p.image_size
    epoch = int(batch["epoch"][0]) if n else 0
    t = _transform(S, p.strength(epoch), p.train, p.crop_pct, p.affine)
    images = np.zeros((n, S, S, 3), dtype=np.uint8)
    valid = np.asarray(batch["valid"], dtype=bool).copy()
    labels = np.asarray(batch["label"], dtype=np.int64).copy()
    dropped = [""] * n
    failed = []

    def rng(i):
        return np.random.default_rng([p.seed % (1 << 63), epoch, int(batch["shard"][i]), int(batch["index"][i])])

    for i in range(n):
        if not valid[i]:
            continue
        try:
            if not batch["data"][i]:
                raise DecodeError("no label or no image")
            images[i] = t(batch["data"][i], batch["ext"][i], rng(i))
        except DecodeError:
            failed.append(i)
            dropped[i] = f"{batch['url'][i]}#{batch['key'][i]}"
    failed_set = set(failed)
    good = [i for i in range(n) if valid[i] and i not in failed_set]
    for k, i in enumerate(failed):
        if not p.train:
            valid[i], labels[i] = False, PAD_LABEL
            continue
        if not good:
            raise DataError(f"no decodable sample in {batch['url'][i]} around sample {batch['index'][i]} to refill "
                            f"{len(failed)} undecodable one(s) ({', '.join(d for d in dropped if d)[:200]})")
        j = good[k % len(good)]
        images[i] = t(batch["data"][j], batch["ext"][j], rng(i))
        labels[i] = labels[j]
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"image": images, "label": labels, "valid": valid, "key": np.asarray(batch["key"], dtype=object),
            "dropped": np.asarray(dropped, dtype=object), "bad": np.asarray(batch["bad"], dtype=object),
            "unreadable": np.asarray(batch["unreadable"], dtype=np.int64), "epoch": np.asarray(batch["epoch"]),
            "node": np.asarray([node] * n, dtype=object)}


def build_dataset(shards: ShardSet, p: IngestParams, clock=None):
    """The split as a lazy Ray Dataset (nothing runs until a worker iterates it)."""
    import ray.data

    if shards.sizes is None:
        raise DataError(f"{shards.location}: data.engine=ray_data needs per-shard sample counts (a manifest)")
    source = _datasource_class()(shards, p, clock)
    # One block per segment, never split further: a block is what the decode refills undecodable rows from.
    blocks = len(_segments(source.sizes, list(range(len(source.sizes))), p.segment_samples))
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, blocks), **p.remote_args())
    ds = ds.map_batches(decode_batch, fn_kwargs={"p": p}, batch_size=None, batch_format="numpy",
                        zero_copy_batch=True, **p.remote_args())
    # Ray Data's per-operator progress bars would repeat on every rank's console (and in ray.log) each epoch; the
    # run's own progress line (console.py) says how far the epoch is.
    ds.context.enable_progress_bars = False
    return ds


def build_datasets(manifest, train_split: str, val_split: str, train: IngestParams, val: IngestParams,
                   clock=None, storage_options: dict | None = None) -> dict:
    from distrain.data.sources import resolve_source

    return {"train": build_dataset(resolve_source(manifest, train_split, storage_options=storage_options,
                                                  check=False), train, clock),
            "val": build_dataset(resolve_source(manifest, val_split, storage_options=storage_options,
                                                check=False), val, clock)}


def ingest_config():
    """Train's DataConfig with exact-once validation: `train` split equal (equal steps), `val` not (no row dropped)."""
    from ray.train import DataConfig

    class IngestConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                for i, split in enumerate(datasets["val"].streaming_split(world_size, equal=False)):
                    out[i]["val"] = split
            return out

    return IngestConfig()


def check_api() -> str | None:
    """None when the installed Ray has what this engine uses, else what is missing (preflight names it)."""
    try:
        import ray
        import ray.data
        from ray.data.datasource import Datasource, ReadTask  # noqa: F401
        from ray.train import DataConfig, ScalingConfig
    except ImportError as e:
        return f"Ray Data is not importable ({e}): install ray[data,train]"
    missing = []
    if "data_context" not in inspect.signature(Datasource.get_read_tasks).parameters:
        missing.append("Datasource.get_read_tasks(data_context=)")
    if "label_selector" not in inspect.signature(ray.data.Dataset.map_batches).parameters:
        missing.append("Dataset.map_batches(label_selector=)")
    if "equal" not in inspect.signature(ray.data.Dataset.streaming_split).parameters:
        missing.append("Dataset.streaming_split(equal=)")
    if "label_selector" not in {f.name for f in dataclasses.fields(ScalingConfig)}:
        missing.append("ray.train.ScalingConfig(label_selector=)")
    if not hasattr(DataConfig, "configure"):
        missing.append("ray.train.DataConfig.configure")
    if missing:
        return (f"data.engine=ray_data needs {', '.join(missing)}, which Ray {ray.__version__} lacks: use "
                f"data.engine=loader or Ray >= 2.60")
    return None


def split_size(shards: ShardSet, limit: int) -> int:
    """N of a split after data.*_limit (what the equal-steps rule divides)."""
    return sum(stratified_limit(list(shards.sizes or []), limit))
