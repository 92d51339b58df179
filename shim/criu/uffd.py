"""The userfaultfd ABI as pyshim's lazy-pages daemon uses it (linux/userfaultfd.h): the messages a restored
process's userfaultfd gives, and the ioctls that answer them. No state: shim.criu.lazy_daemon keeps that."""

from __future__ import annotations

import ctypes
import errno
import functools
import struct

PAGE_SIZE = 4096
MESSAGE = struct.Struct("=B3x4x24s")  # u8 event, reserved, then the 24-byte union
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16
EVENT_NAMES = {EVENT_PAGEFAULT: "PAGEFAULT", EVENT_FORK: "FORK", EVENT_REMAP: "REMAP", EVENT_REMOVE: "REMOVE",
               EVENT_UNMAP: "UNMAP"}


def _ioc(direction: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAA << 8 | number


_READ, _READ_WRITE = 2, 3
UFFDIO_UNREGISTER = _ioc(_READ, 0x01, 16)
UFFDIO_WAKE = _ioc(_READ, 0x02, 16)
UFFDIO_COPY = _ioc(_READ_WRITE, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_READ_WRITE, 0x04, 32)


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class Message:
    """One userfaultfd message, the fields its event has."""

    __slots__ = ("event", "address", "fd", "start", "end", "to", "length")

    def __init__(self, event: int, *, address: int = 0, fd: int = -1, start: int = 0, end: int = 0, to: int = 0,
                 length: int = 0) -> None:
        self.event = event
        self.address = address  # PAGEFAULT: the faulting address, page-aligned
        self.fd = fd  # FORK: the child's userfaultfd, now ours
        self.start = start  # REMAP: from; REMOVE, UNMAP: start
        self.end = end  # REMOVE, UNMAP
        self.to = to  # REMAP
        self.length = length  # REMAP

    @property
    def name(self) -> str:
        return EVENT_NAMES.get(self.event, f"event {self.event:#x}")

    def __repr__(self) -> str:
        if self.event == EVENT_PAGEFAULT:
            return f"PAGEFAULT {self.address:#x}"
        if self.event == EVENT_FORK:
            return f"FORK ufd {self.fd}"
        if self.event == EVENT_REMAP:
            return f"REMAP {self.start:#x} -> {self.to:#x} ({self.length:#x})"
        return f"{self.name} {self.start:#x}-{self.end:#x}"


def decode(data: bytes) -> list[Message]:
    messages = []
    for offset in range(0, len(data) - len(data) % MESSAGE.size, MESSAGE.size):
        event, union = MESSAGE.unpack_from(data, offset)
        if event == EVENT_PAGEFAULT:
            _flags, address = struct.unpack_from("=QQ", union)
            messages.append(Message(event, address=address & ~(PAGE_SIZE - 1)))
        elif event == EVENT_FORK:
            messages.append(Message(event, fd=struct.unpack_from("=I", union)[0]))
        elif event == EVENT_REMAP:
            start, to, length = struct.unpack_from("=QQQ", union)
            messages.append(Message(event, start=start, to=to, length=length))
        else:
            start, end = struct.unpack_from("=QQ", union)
            messages.append(Message(event, start=start, end=end))
    return messages


@functools.cache
def _ioctl():
    function = ctypes.CDLL(None, use_errno=True).ioctl
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def _call(fd: int, request: int, argument: ctypes.Structure) -> int:
    """0, or the errno of the failed ioctl."""
    if _ioctl()(fd, request, ctypes.byref(argument)) == 0:
        return 0
    return ctypes.get_errno()


def copy(fd: int, address: int, source: int, length: int) -> tuple[int, int]:
    """UFFDIO_COPY of length bytes at source (an address in this process) to address, waking whoever waits there:
    (bytes copied, errno). A copy that stopped part way (a page present already, a mapping's end) gives the bytes
    it did and EAGAIN; one that could not start, 0 and the reason (EAGAIN too while the mappings change, ESRCH once
    the process is gone)."""
    argument = _Copy(address, source, length, 0, 0)
    error = _call(fd, UFFDIO_COPY, argument)
    if not error:
        return length, 0
    done = argument.copy
    return (done, errno.EAGAIN) if done > 0 else (0, -done if done < 0 else error)


def zeropage(fd: int, address: int, length: int = PAGE_SIZE) -> int:
    """Map zero pages (memory the checkpoint never had), waking the waiter: 0 or errno (EEXIST: mapped already)."""
    return _call(fd, UFFDIO_ZEROPAGE, _Zeropage(_Range(address, length), 0, 0))


def unregister(fd: int, address: int, length: int) -> int:
    """Stop serving a range (faults there are the kernel's again) and wake its waiters: 0 or errno."""
    return _call(fd, UFFDIO_UNREGISTER, _Range(address, length))


def wake(fd: int, address: int, length: int) -> int:
    """Wake the threads waiting in a range, to fault again: 0 or errno."""
    return _call(fd, UFFDIO_WAKE, _Range(address, length))
