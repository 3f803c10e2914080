"""Reading W&B offline run folders back (tests only): the `.wandb` record log decoded, before anything is synced.

Usage:
    from wandb_offline import read_offline_run
    run = read_offline_run(folder, wait_s=10)      # OfflineRun(config, history, summary, artifacts, exit_code, ...)

A `.wandb` file is a LevelDB-style log of 32 KiB blocks holding protobuf `Record`s (wandb.proto). The tests decode
it with W&B's own protobuf classes to assert what a run wrote, since `wandb sync` needs a server.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    """What an offline run folder holds, decoded from its `run-<id>.wandb` record log."""

    path: Path
    run: dict[str, Any] = field(default_factory=dict)  # id, project, group, job_type, tags, name
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # type, name, files {path: local file}
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def table(self, path: str) -> dict:
        """A logged table's JSON (`files/<path>`), e.g. the `path` of a history value of type table-file."""
        return json.loads((self.path / "files" / path).read_text())


def _records(path: Path):
    """Records of a W&B `.wandb` file: a LevelDB-style log of 32 KiB blocks holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run log (header {data[:7]!r})")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += block - pos % block if pos % block else 0
            continue
        if pos + length > len(data):  # a record still being written
            return
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _item_value(item) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    # History items may carry a typed value instead of JSON.
    which = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    return None if which in (None, "none") else getattr(item, which)


def _item_key(item) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_nested(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def read_offline_run(path: str | Path, wait_s: float = 0.0) -> OfflineRun:
    """Decode an offline run folder (`offline-run-*`) or its `.wandb` file: config, history, summary, artifacts.

    wandb's core process writes the file in the background and may still be at it for a moment after
    `run.finish()` returns: `wait_s` waits up to that long for the run's exit record (`exit_code` stays None for
    a run that is still going, or that crashed).
    """
    path = Path(path)
    log = path if path.suffix == ".wandb" else next(iter(sorted(path.glob("run-*.wandb"))), None)
    if log is None:
        raise FileNotFoundError(f"{path}: no run-*.wandb file (not a W&B run folder?)")
    deadline = time.monotonic() + wait_s
    while True:
        out = _decode(log)
        if out.exit_code is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _decode(log: Path) -> OfflineRun:
    out = OfflineRun(path=log.parent)
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.run = {"id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group,
                       "job_type": r.job_type, "tags": list(r.tags), "name": r.display_name}
            for item in r.config.update:
                _set_nested(out.config, _item_key(item), _item_value(item))
        elif kind == "config":
            for item in record.config.update:
                _set_nested(out.config, _item_key(item), _item_value(item))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, _item_key(item), _item_value(item))
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(out.summary, _item_key(item), _item_value(item))
        elif kind == "artifact":
            a = record.artifact
            out.artifacts.append({"type": a.type, "name": a.name, "files": {
                e.path: e.local_path for e in a.manifest.contents}})
        elif kind == "files":
            out.files.extend(f.path for f in record.files.files)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out
