"""Protocol Buffers' base-128 varints, by hand: for the few places that must write or read a small message without
importing protobuf (the `delete` action on containerd's hot path, CRIU's pagemap entries split record by record)."""

from __future__ import annotations


def encode_varint(value: int) -> bytes:
    """value (>= 0) as a varint: seven bits a byte, least significant first, the high bit set on all but the last."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)
