"""The framed protocol between `pyshim migrate` and `pyshim migrate-receive`, without I/O (shim/tool/migrate/channel.py
reads and writes the frames).

A frame is one byte saying what it carries, four bytes of payload length (big-endian) and the payload:

    J  a control message, one JSON object with a "type" (hello, prepare, restore, commit, ... and their answers)
    D  a chunk of the checkpoint archive (a tar stream); an empty D frame ends the archive
    P  bytes of CRIU's page-server connection, in either direction; an empty P frame ends that direction

The receiver speaks first (a hello naming the protocol version), so that a destination whose `pyshim` is missing, too
old, or whose shell writes to stdout is recognised at once instead of misread.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

CONTROL = b"J"
ARCHIVE = b"D"
PAGES = b"P"
KINDS = (CONTROL, ARCHIVE, PAGES)
HEADER = struct.Struct(">cI")
MAX_PAYLOAD = 8 << 20  # a chunk is at most 1 MiB; anything far larger is not our protocol
# A payload as it is sent (a file's bytes, a view of a buffer) or received (a buffer the frame was read into).
Payload = bytes | bytearray | memoryview
PROTOCOL_VERSION = 1
HELLO = "pyshim-migrate"


class ProtocolError(Exception):
    """The peer sent something that is not this protocol."""


@dataclass(frozen=True)
class Frame:
    kind: bytes
    payload: bytes | bytearray

    def message(self) -> dict:
        """A control frame's JSON object."""
        try:
            value = json.loads(self.payload)
        except ValueError as exc:
            raise ProtocolError(f"a control frame is not JSON ({exc})") from None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ProtocolError(f"a control frame is not a message with a type: {self.payload[:80]!r}")
        return value


def header(kind: bytes, length: int) -> bytes:
    """The five bytes before a payload of `length` bytes."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    if length > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, length)


def parse_header(data: bytes) -> tuple[bytes, int]:
    """A frame's kind and payload length from its five bytes; ProtocolError when they cannot be ours."""
    kind, length = HEADER.unpack_from(data)
    if kind not in KINDS or length > MAX_PAYLOAD:
        raise ProtocolError(f"not pyshim's migrate protocol (read {data[:40]!r})")
    return kind, length


def encode(kind: bytes, payload: bytes = b"") -> bytes:
    return header(kind, len(payload)) + payload


def message_payload(message_type: str, **fields) -> bytes:
    return json.dumps({"type": message_type, **fields}, sort_keys=True).encode()


def encode_message(message_type: str, **fields) -> bytes:
    return encode(CONTROL, message_payload(message_type, **fields))


def check_hello(message: dict) -> None:
    """The receiver's first message: ours, and a protocol version this side speaks."""
    if message.get("type") != "hello" or message.get("protocol_name") != HELLO:
        raise ProtocolError(f"the destination did not greet as pyshim migrate-receive: {message}")
    if message.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"the destination's pyshim speaks migrate protocol {message.get('protocol')}, this one "
                            f"{PROTOCOL_VERSION}: install the same pyshim version on both hosts")
