"""`distrain shards build` writes WebDataset shards from images; `shards index` indexes shards other tools wrote, in
place; `distrain shards inspect` describes either.

Usage:
    distrain shards build photos/ --out data/photos --max-side 384 --workers 4
    distrain shards build labels.csv --out s3://bucket/photos --classes cat,dog --val-fraction 0.2
    distrain shards build fashion-mnist --out data/fashion-mnist --limit 2000
    distrain shards index --out data/mine --split train='s3://b/wds/train-{000000..000099}.tar' --val-shards 2
    distrain shards inspect data/photos --verify

Both end with one JSON line of figures (`tail -n 1`).
"""

from __future__ import annotations

import re
import sys

from distrain.cli import CommandError, count, emit_json, number

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """'64MB' → 64000000, '1GiB' → 1073741824, '0' → 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        import argparse

        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MB, 512MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="write shards from an image folder, a CSV file or fashion-mnist",
                       description="Write WebDataset shards + manifest.json from SOURCE: an ImageFolder "
                                   "(SOURCE/<class>/**/<image>), a CSV with path,label[,split] columns, or "
                                   "`fashion-mnist`.")
    b.add_argument("source", help="image folder, .csv file, or fashion-mnist")
    b.add_argument("--out", "-o", required=True, help="output folder: a local path or fsspec URL (s3://...)")
    b.add_argument("--val-fraction", type=number(0.0, 0.99), default=0.1,
                   help="fraction of each class held out as the val split (default 0.1; 0 = no val split)")
    b.add_argument("--seed", type=int, default=0, help="seed of val split, --limit and shuffle (default 0)")
    b.add_argument("--shard-size", type=count(0), default=1000,
                   help="samples per shard (default 1000; 0 = no limit)")
    b.add_argument("--shard-bytes", type=byte_size, default=64_000_000,
                   help="bytes per shard, e.g. 64MB or 256MiB (default 64MB; 0 = no limit)")
    b.add_argument("--max-side", type=count(0), default=0,
                   help="shrink images so the longer side is at most this, keeping aspect (default 0 = keep)")
    b.add_argument("--quality", type=count(1, 100), default=90, help="JPEG quality (default 90)")
    b.add_argument("--lossless", action="store_true", help="store PNG instead of JPEG")
    b.add_argument("--workers", type=count(0), default=0, help="encode processes (default: one per CPU)")
    b.add_argument("--limit", type=count(0), default=0,
                   help="at most N samples per split, stratified by class (default 0 = all)")
    b.add_argument("--classes", help="class names in label order: a,b,c or a file with one per line "
                                     "(default: sorted folder names / CSV labels)")
    b.add_argument("--prefix", default="", help="shard file prefix: PREFIX-<split>-NNNNNN.tar "
                                                "(default <split>-NNNNNN.tar)")
    b.add_argument("--overwrite", action="store_true", help="replace the shards of an existing output folder")
    b.add_argument("--no-download", action="store_true", help="fashion-mnist: never try to download it")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    x = sub.add_parser("index", help="index WebDataset shards other tools wrote, in place (a manifest, no copy)",
                       description="Write manifest.json (+ timm's _info.json) in --out for existing WebDataset "
                                   "shards, which stay where they are: each --split NAME=SOURCE is a folder, a glob, "
                                   "a brace pattern or a text file of URLs (local, NFS, s3://, gs://, http://).")
    x.add_argument("--out", "-o", required=True, help="where manifest.json goes (local path or fsspec URL)")
    x.add_argument("--split", action="append", required=True, metavar="NAME=SOURCE",
                   help="a split and its shards, e.g. train='s3://b/train-{000000..000099}.tar' (repeatable)")
    x.add_argument("--val-shards", type=count(0), default=0, help="one --split only: hold out N whole shards as val")
    x.add_argument("--val-fraction", type=number(0.0, 0.99), default=0.0,
                   help="one --split only: hold out this fraction of its shards as val (at least one)")
    x.add_argument("--seed", type=int, default=0, help="seed of the val cut (default 0)")
    x.add_argument("--label", default="", help="cls, label, target, txt or json:FIELD (default: the first of "
                                               "cls, label, target present)")
    x.add_argument("--classes", help="class names in label order: a,b,c or a file with one per line (default: "
                                     "discovered: sorted names, or 0..K-1 for integer labels)")
    x.add_argument("--image-key", default="", help="the image's extension (default: the first of jpg, jpeg, "
                                                   "png, webp present)")
    x.add_argument("--workers", type=count(0), default=0, help="reader processes (default: one per CPU)")
    x.add_argument("--ray", action="store_true", help="read the shards with Ray tasks (joins RAY_ADDRESS or "
                                                      "starts a local Ray)")
    x.add_argument("--strict", action="store_true", help="an unreadable shard is an error (default: left out "
                                                         "and listed)")
    x.add_argument("--verify", action="store_true", help="decode every image (default: headers only)")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="class counts, shard sizes and skipped inputs; --verify re-reads all",
                       description="Describe a shards folder from its manifest; --verify re-reads every "
                                   "shard and checks counts and checksums.")
    i.add_argument("dir", help="shards folder (local path or fsspec URL)")
    i.add_argument("--verify", action="store_true", help="re-read all shards: sizes, sha256, samples, labels")
    i.add_argument("--decode", action="store_true", help="with --verify: also decode every image")
    i.add_argument("--max-skipped", type=count(0), default=20, help="skipped inputs listed (default 20; 0 = all)")
    i.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args) -> int:
    return {"build": _build, "index": _index, "inspect": _inspect}[args.action](args)


def _index(args) -> int:
    from distrain.data.index import IndexError_, IndexOptions, index_shards
    from distrain.shards.sources import SourceError, parse_classes

    splits = {}
    for item in args.split:
        name, eq, source = item.partition("=")
        if not eq or not name or not source:
            raise CommandError(f"--split {item!r}: expected NAME=SOURCE, e.g. train=/data/shards/")
        if name in splits:
            raise CommandError(f"--split {name} given twice")
        splits[name] = source
    try:
        classes = parse_classes(args.classes) if args.classes else None
    except SourceError as e:
        raise CommandError(str(e)) from None
    opts = IndexOptions(label=args.label, classes=classes, image_key=args.image_key.lower().lstrip("."),
                        val_shards=args.val_shards, val_fraction=args.val_fraction, seed=args.seed,
                        workers=args.workers, ray=args.ray, strict=args.strict, verify=args.verify,
                        progress=not args.quiet)
    if args.ray:
        from distrain import runtime

        runtime.connect()
    try:
        figures = index_shards(splits, args.out, opts)
    except (IndexError_, OSError) as e:
        raise CommandError(str(e)) from None
    emit_json(figures)
    return 0


def _build(args) -> int:
    from distrain.shards.build import BuildError, BuildOptions, build_shards
    from distrain.shards.manifest import ManifestError
    from distrain.shards.report import build_summary
    from distrain.shards.sources import Source, SourceError, open_source
    from distrain.shards.writer import OutputError

    options = BuildOptions(val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size,
                           shard_bytes=args.shard_bytes, max_side=args.max_side, quality=args.quality,
                           lossless=args.lossless, workers=args.workers, limit=args.limit,
                           overwrite=args.overwrite, prefix=args.prefix)
    try:
        options.check()
        source: Source = open_source(args.source, args.classes, download=not args.no_download)
        result = build_shards(source, args.out, options, progress=not args.quiet)
    except (SourceError, OutputError, BuildError, ManifestError) as e:  # one clear line, no traceback
        raise CommandError(str(e)) from None
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    figures = result.figures()
    print(build_summary(result.manifest, figures))
    emit_json(figures)
    return 0


def _inspect(args) -> int:
    from distrain.shards.manifest import ManifestError, load_manifest
    from distrain.shards.manifest import figures as manifest_figures
    from distrain.shards.report import inspect_text
    from distrain.shards.verify import verify_shards

    try:
        manifest = load_manifest(args.dir)
    except ManifestError as e:
        raise CommandError(str(e)) from None
    figures = {"dir": manifest.location, **manifest_figures(manifest)}
    counts = None
    report = None
    if args.verify and manifest.source.startswith("index:"):  # shards other tools wrote: read with the loader's reader
        from distrain.data.index import verify_index

        report = verify_index(manifest, decode=args.decode, progress=not args.quiet)
        counts = None
    elif args.verify:
        report = verify_shards(manifest, decode=args.decode, progress=not args.quiet)
        counts = report.class_counts
    print(inspect_text(manifest, counts, args.max_skipped))
    if report is not None:
        print()
        if report.ok:
            print(f"verified {report.shards} shards, {report.samples} samples in {report.seconds:.1f} s: "
                  f"sizes, sha256, sample counts and labels match the manifest")
        else:
            print(f"verify FAILED: {len(report.problems)} problem(s)")
            for p in report.problems[:50]:
                print(f"  {p}")
            if len(report.problems) > 50:
                print(f"  ... and {len(report.problems) - 50} more")
        figures.update(verified=report.ok, problems=len(report.problems),
                       verify_seconds=round(report.seconds, 3),
                       verify_mb_per_s=round(report.bytes / 1e6 / max(report.seconds, 1e-9), 1))
    emit_json(figures)
    return 0 if report is None or report.ok else 1
