"""TensorBoard event files of scalars, written directly (no tensorboardX, no protobuf).

A run logs only scalars, and TensorBoard reads any file named `*tfevents*` whose records are
TFRecords (length, masked CRC-32C of the length, data, masked CRC-32C of the data) of `Event`
protocol buffers. Encoding the three messages used (Event, Summary.Value, SessionLog) by hand
is a few lines; tensorboardX's writer imported torch when installed, a second or two of every
run's start.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tf_record(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(step: int, wall_time: float, *, scalars: dict[str, float] | None = None,
          file_version: str | None = None, session_start: bool = False) -> bytes:
    """An encoded `Event`: wall_time (1), step (2), file_version (3), summary (5) of simple
    values (Summary.Value: tag 1, simple_value 2), session_log (7) with status START (1)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _field(5, values)
    if session_start:
        out += _field(7, b"\x08\x01")
    return out


class EventWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `log_dir`. With
    `purge_step`, TensorBoard drops the events at and after that step from the files before
    (a resumed run replaces what its earlier attempt logged past its checkpoint)."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        log_dir = pathlib.Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = log_dir / name
        self._file = self.path.open("ab")
        self._write(event(purge_step or 0, time.time(), file_version="brain.Event:2"))
        if purge_step:
            self._write(event(purge_step, time.time(), session_start=True))
        self._file.flush()

    def _write(self, encoded_event: bytes) -> None:
        self._file.write(tf_record(encoded_event))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """One event holding every scalar of `step`, flushed to disk."""
        self._write(event(step, time.time(), scalars={k: float(v) for k, v in scalars.items()}))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
