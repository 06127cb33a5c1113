"""Read a W&B offline run back: the records of run-<id>.wandb, with wandb's own protobuf classes.

wandb 0.31 no longer ships a Python reader (its Go core writes the file), so the container is
parsed here: the LevelDB log format (a 7-byte ":W&B" header, then 32 KiB blocks of chunks, each
with a 4-byte CRC, a 2-byte length and a 1-byte type: full / first / middle / last) around
`wandb.proto.wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (starts {data[:4]!r})")
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The .wandb files under output_dir/wandb, oldest first (a resume adds a directory)."""
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))


def read_run(path: str | Path) -> dict:
    """{"run_id", "name", "tags", "config": {key: value}, "history": [{key: value}], "summary": {key: value}}."""
    run = {"history": [], "summary": {}, "config": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, name=record.run.display_name, tags=list(record.run.tags),
                       project=record.run.project)
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update if i.key})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    return run
