"""ttrpc frames: a 10-byte header (payload length, stream id, type, flags) and a payload.

Pure byte handling, no I/O. A frame whose declared length exceeds the limit is not
buffered: its payload is skipped as it arrives and an OversizedFrame reports it, so one
bad message costs neither memory nor the connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
MAX_PAYLOAD = 4 << 20


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame over the limit; its payload was discarded."""

    stream_id: int
    type: int
    length: int


class FrameTooLarge(ValueError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message length {length} exceeds the maximum message size of {limit}")
        self.length = length
        self.limit = limit


def encode_frame(stream_id: int, frame_type: int, payload: bytes, flags: int = 0,
                 max_payload: int = MAX_PAYLOAD) -> bytes:
    if len(payload) > max_payload:
        raise FrameTooLarge(len(payload), max_payload)
    return HEADER.pack(len(payload), stream_id, frame_type, flags) + payload


class FrameReader:
    """Turns a byte stream into frames, in order, however the bytes are split."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized payload still to discard

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buffer = self._buffer
        buffer += data
        frames: list[Frame | OversizedFrame] = []
        pos = 0
        while len(buffer) - pos >= HEADER.size:
            length, stream_id, frame_type, flags = HEADER.unpack_from(buffer, pos)
            if length > self.max_payload:
                frames.append(OversizedFrame(stream_id, frame_type, length))
                pos += HEADER.size
                dropped = min(length, len(buffer) - pos)
                pos += dropped
                self._skip = length - dropped
                continue
            end = pos + HEADER.size + length
            if end > len(buffer):
                break
            frames.append(Frame(stream_id, frame_type, flags, bytes(buffer[pos + HEADER.size:end])))
            pos = end
        del buffer[:pos]
        return frames
