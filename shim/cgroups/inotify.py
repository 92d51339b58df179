"""A minimal inotify binding (through libc, as the standard library has none): create a
non-blocking instance, add watches, and decode the events read from it."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

IN_MODIFY = 0x00000002
IN_DELETE_SELF = 0x00000400
IN_IGNORED = 0x00008000  # the watch is gone: file deleted, or its filesystem unmounted

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str


def init() -> int:
    """A new inotify file descriptor, non-blocking and close-on-exec (IN_NONBLOCK and
    IN_CLOEXEC have the values of their O_ namesakes)."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return fd


def add_watch(fd: int, path: str | os.PathLike[str], mask: int) -> int:
    wd = _libc.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))
    return wd


def parse_events(data: bytes) -> list[Event]:
    events = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        name = data[offset : offset + length].rstrip(b"\0").decode(errors="replace")
        offset += length
        events.append(Event(wd, mask, name))
    return events
