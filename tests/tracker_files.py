"""Read back what the trackers wrote, from their own files: tensorboard's event files (its EventAccumulator),
a wandb offline run's transaction log, trackio's local database.

wandb ships no Python reader of its `.wandb` file since its Go core took over; the file is LevelDB's log
format (32 KiB blocks of records: crc32c, length, type) after a 7-byte ":W&B" header, and each record is
one `wandb_internal_pb2.Record`, so the reader is short.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

LEVELDB_BLOCK = 32768
LEVELDB_HEADER = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files under `logdir` (values are float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _leveldb_records(data: bytes, start: int) -> list[bytes]:
    records, pos, pending = [], start, b""
    while pos + LEVELDB_HEADER <= len(data):
        left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        if left < LEVELDB_HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + LEVELDB_HEADER])
        chunk = data[pos + LEVELDB_HEADER:pos + LEVELDB_HEADER + length]
        pos += LEVELDB_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def wandb_history(wandb_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} of the single offline run under `wandb_dir` (`<logs>/wandb`)."""
    from wandb.proto.wandb_internal_pb2 import Record

    files = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B", data[:7]
    history = {}
    for raw in _leveldb_records(data, 7):
        record = Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    return history


def trackio_metrics(db: Path, run_name: str) -> dict[int, dict]:
    """{step: {key: value}} of one run in trackio's local project database (`<TRACKIO_DIR>/<project>.db`)."""
    out: dict[int, dict] = {}
    with sqlite3.connect(db) as conn:
        for step, metrics in conn.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id",
                                          (run_name,)):
            out.setdefault(step, {}).update(json.loads(metrics))
    return out
