"""Read back the scalars an offline wandb run or a local SwanLab run recorded (tests only).

Both packages write a LevelDB-log journal of protobuf records (32 KiB blocks; each chunk has a
7-byte header: crc32, length, type = full/first/middle/last); this reads it without their
internals, then decodes each record with the package's own protobuf class.
"""

import pathlib
import struct

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def journal_records(path: pathlib.Path):
    """The payloads of the journal at `path` (after its 7-byte file header)."""
    data = path.read_bytes()
    index, pending = HEADER, b""
    while index + HEADER <= len(data):
        if BLOCK - index % BLOCK < HEADER:  # the rest of a block is padding
            index += BLOCK - index % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[index:index + HEADER])
        chunk = data[index + HEADER:index + HEADER + length]
        index += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:
            break  # zero padding at the end of a file still being written


def wandb_history(run_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every offline wandb run under `run_dir`/wandb."""
    import json

    from wandb.proto import wandb_internal_pb2

    history: dict[str, dict[int, float]] = {}
    for journal in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for payload in journal_records(journal):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            step = int(items.get("_step", record.history.step.num))
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
    return history


def swanlab_history(run_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every local SwanLab run under `run_dir`/swanlog."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    history: dict[str, dict[int, float]] = {}
    for journal in sorted(run_dir.glob("swanlog/run-*/run-*.swanlab")):
        for payload in journal_records(journal):
            record = Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "scalar":
                scalar = record.scalar
                history.setdefault(scalar.key, {})[int(scalar.step)] = scalar.value.number
    return history


def run_ids(run_dir: pathlib.Path, kind: str) -> list[str]:
    """The run id of each run folder the tracker wrote, in time order."""
    pattern = "wandb/offline-run-*" if kind == "wandb" else "swanlog/run-*"
    return [p.name.rsplit("-", 1)[-1] for p in sorted(run_dir.glob(pattern))]


def tensorboard_history(log_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `log_dir` as TensorBoard shows them: records
    framed and checksummed as TFRecords, decoded with tensorboardX's protobuf classes, files in
    name (time) order, a SessionLog START at step s dropping the earlier files' steps >= s."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    history: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("*tfevents*")):
        data, index = path.read_bytes(), 0
        while index < len(data):
            header = data[index:index + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
                "<I", data[index + 8:index + 12])
            payload = data[index + 12:index + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[index + 12 + length:index + 16 + length])
            assert (header_crc, payload_crc) == (masked(header), masked(payload)), path
            index += 16 + length
            event = Event.FromString(payload)
            if event.session_log.status == SessionLog.START:
                for steps in history.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                history.setdefault(value.tag, {})[event.step] = value.simple_value
    return history
