"""CRIU's page-server protocol, as `criu lazy-pages --page-server` speaks it to a page server: bytes in, requests
out, answers to bytes (sans-IO; shim.criu.page_server does the I/O).

Every message starts with one fixed header, CRIU's `struct page_server_iov` in the host's byte order (CRIU sends
its memory as it is): `u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id`, 32 bytes with the 4 bytes of alignment
after `cmd` (CRIU 4.x; 3.x had a u32 nr_pages and 24 bytes). `cmd` holds the command in its low 16 bits and
pagemap flags in its high 16. What a lazy-pages daemon sends, and what it is answered:

- GET (7) {nr_pages, vaddr, dst_id = the process's pid in the images}: the pages of that process from vaddr on. The
  answer is a header ADD_F (6) with PE_PRESENT in its flags, the same vaddr and dst_id and the number of pages that
  follow (at most nr_pages; fewer is allowed: the daemon asks again for the rest), then the pages themselves.
- CLOSE (0x1023), or FORCE_CLOSE (0x1024) from a daemon given its socket with --ps-socket: the daemon is done
  (after its last page, and also when it gave up). The answer is a 32-bit status, 0; then the daemon closes.
"""

from __future__ import annotations

import struct
import sys
from typing import NamedTuple

HEADER = struct.Struct("=I4xQQQ")  # native order, CRIU's alignment made explicit
STATUS = struct.Struct("=i")
PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
CMD_BITS = 16
CMD_MASK = (1 << CMD_BITS) - 1
PE_PRESENT = 1 << 2  # criu/include/pagemap.h
NAMES = {PS_IOV_ADD: "ADD", PS_IOV_HOLE: "HOLE", PS_IOV_OPEN: "OPEN", PS_IOV_OPEN2: "OPEN2",
         PS_IOV_PARENT: "PARENT", PS_IOV_ADD_F: "ADD_F", PS_IOV_GET: "GET", PS_IOV_CLOSE: "CLOSE",
         PS_IOV_FORCE_CLOSE: "FORCE_CLOSE"}
assert HEADER.size == 32 and sys.byteorder == "little", "CRIU's page_server_iov as x86-64 and arm64 lay it out"


class ProtocolError(ValueError):
    """Bytes a lazy-pages daemon would not send: the session cannot go on."""


class Request(NamedTuple):  # a NamedTuple, not a dataclass: the lazy-pages daemon's start-up is on a restore's path
    command: int  # PS_IOV_* without flags
    flags: int
    nr_pages: int
    vaddr: int
    pid: int  # dst_id: for GET, the process whose pages are asked for

    @property
    def name(self) -> str:
        return NAMES.get(self.command, f"command {self.command:#x}")


def encode_header(command: int, *, flags: int = 0, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
    return HEADER.pack(flags << CMD_BITS | command, nr_pages, vaddr, dst_id)


def decode_header(data: bytes) -> Request:
    if len(data) != HEADER.size:
        raise ProtocolError(f"a page-server header is {HEADER.size} bytes, got {len(data)}")
    cmd, nr_pages, vaddr, dst_id = HEADER.unpack(data)
    return Request(cmd & CMD_MASK, cmd >> CMD_BITS, nr_pages, vaddr, dst_id)


def pages_answer(request: Request, nr_pages: int) -> bytes:
    """The header sent before nr_pages pages answering a GET."""
    return encode_header(PS_IOV_ADD_F, flags=PE_PRESENT, nr_pages=nr_pages, vaddr=request.vaddr, dst_id=request.pid)


def close_answer(status: int = 0) -> bytes:
    return STATUS.pack(status)


class RequestReader:
    """Headers out of a byte stream that arrives in pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Request]:
        self._buffer += data
        requests = []
        while len(self._buffer) >= HEADER.size:
            requests.append(decode_header(bytes(self._buffer[:HEADER.size])))
            del self._buffer[:HEADER.size]
        return requests

    @property
    def pending(self) -> int:
        """Bytes of a header not complete yet (at EOF: a daemon that died mid-message)."""
        return len(self._buffer)
