"""WebDataset shards: build them from image folders, CSV files or known datasets; read their manifest.

Modules, in the order a build uses them:
    sources.py   inputs as labelled records: ImageFolder, CSV (`path,label[,split]`), Fashion-MNIST
    split.py     stratified, seeded val split, --limit, shuffle
    encode.py    robust decode (EXIF, CMYK/16-bit/alpha → RGB), resize, JPEG/PNG encode; runs in workers
    writer.py    tar shards on any fsspec URL: rolling, temp names, sha256, fixed headers
    build.py     the pipeline: source → plan → process pool → writer → _info.json → manifest.json (last)
    manifest.py  the manifest format and reader used downstream
    verify.py    re-read shards and check them against the manifest
    report.py    text tables for `build` and `inspect`
    bench.py     shard-writing throughput with 1 and 2 workers
"""
