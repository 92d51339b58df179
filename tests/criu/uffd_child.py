"""A process whose memory comes lazily, for the lazy-pages daemon's tests: it maps PAGES pages, registers them with
a userfaultfd of its own (user mode only: no privileges needed), and obeys lines on stdin:

  register DIR PID   hand the userfaultfd to the daemon listening in DIR, as `criu restore --lazy-pages` does
  finish             say the restore has finished, as CRIU does after its last process
  handover           send the userfaultfd over the socket whose fd is argv[2] (the test then plays the restore)
  read N             print page N's first byte (faulting on it if it has not come)
  wait N             a thread reads page N (the GIL let go while it faults) and prints "page N: BYTE" when it can
  drop N COUNT       madvise(MADV_DONTNEED) pages N.. (the daemon gets a REMOVE event)
  unmap N COUNT      munmap pages N.. (UNMAP)
  move N COUNT [dontunmap]   mremap pages N.. elsewhere (REMAP); with MREMAP_DONTUNMAP their old place stays mapped
  protect N COUNT    mprotect pages N.. read-only (their mapping splits in three; no event)
  crowd              map single pages until vm.max_map_count is reached: no mapping can be split any more
  sum                print the sha256 of the pages still mapped, in page order, wherever they are now

Pages are known by their number in the region as first mapped; `move` changes where they are, `unmap` removes them.
"""

import ctypes
import hashlib
import os
import platform
import socket
import struct
import sys
import threading

PAGE = 4096
SYSCALLS = {"x86_64": {"userfaultfd": 323, "mremap": 25}, "aarch64": {"userfaultfd": 282, "mremap": 216}}
UFFD_USER_MODE_ONLY = 1
UFFDIO_API, UFFDIO_REGISTER = 0xC018AA3F, 0xC020AA00
FEATURES = 1 << 2 | 1 << 3 | 1 << 6  # EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP (EVENT_FORK, 1 << 1, needs privileges)
PROT_NONE, PROT_READ, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS = 0, 1, 3, 0x22
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.syscall.restype = ctypes.c_long
calls = SYSCALLS[platform.machine()]


def checked(result: int, what: str) -> int:
    if result in (-1, None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


pages = int(sys.argv[1])
base = checked(libc.mmap(None, pages * PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0), "mmap")
where: list[int | None] = [base + n * PAGE for n in range(pages)]  # page number -> its address now
fd = libc.syscall(calls["userfaultfd"], os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
if fd < 0:
    print("refused", ctypes.get_errno(), flush=True)
    sys.exit(0)
api = (ctypes.c_uint64 * 3)(0xAA, FEATURES, 0)
register = (ctypes.c_uint64 * 4)(base, pages * PAGE, 1, 0)  # mode MISSING
for request, argument in ((UFFDIO_API, api), (UFFDIO_REGISTER, register)):
    if libc.ioctl(fd, ctypes.c_ulong(request), argument) != 0:
        print("refused", ctypes.get_errno(), flush=True)
        sys.exit(0)
print("ready", base, flush=True)
output = threading.Lock()


def say(line: str) -> None:
    with output:
        print(line, flush=True)


def first_byte(page: int) -> int:
    address = where[page]
    assert address is not None, f"page {page} is unmapped"
    return ctypes.string_at(address, 1)[0]


def wait_for(page: int) -> None:
    """Read the page through memmove, a foreign call: the GIL is let go while the thread waits in its fault."""
    byte = ctypes.create_string_buffer(1)
    libc.memmove(byte, ctypes.c_void_p(where[page]), ctypes.c_size_t(1))
    say(f"page {page}: {byte.raw[0]}")


def move(first: int, count: int, dontunmap: bool) -> None:
    start = where[first]
    assert start is not None and all(where[first + n] == start + n * PAGE for n in range(count))
    length = count * PAGE
    target = checked(libc.mmap(None, length, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0), "mmap")
    flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if dontunmap else 0)
    moved = libc.syscall(calls["mremap"], ctypes.c_void_p(start), ctypes.c_size_t(length), ctypes.c_size_t(length),
                         ctypes.c_int(flags), ctypes.c_void_p(target))
    if moved != target:
        raise OSError(ctypes.get_errno(), f"mremap: {os.strerror(ctypes.get_errno())}")
    for n in range(count):
        where[first + n] = target + n * PAGE


def crowd() -> int:
    """Map pages one by one, alternately readable or not so that none merges, until the kernel refuses."""
    made = 0
    while made < 1 << 20 and libc.mmap(None, PAGE, PROT_READ if made % 2 else PROT_NONE, MAP_PRIVATE_ANONYMOUS, -1,
                                       0) not in (None, MAP_FAILED):
        made += 1
    return made


daemon = None
handover = socket.socket(fileno=int(sys.argv[2])) if len(sys.argv) > 2 else None
for line in sys.stdin:
    command, *args = line.split()
    numbers = [int(arg) for arg in args if arg.isdigit()]
    if command == "register":
        os.chdir(args[0])
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect("lazy-pages.socket")
        daemon.sendall(struct.pack("=i", int(args[1])))
        socket.send_fds(daemon, [b"\0"], [fd])
        os.close(fd)  # the daemon's now, as a restored process keeps none
        say("registered")
    elif command == "finish":
        assert daemon is not None
        daemon.sendall(struct.pack("=I", 0x52535446))
        daemon.close()
        say("finished")
    elif command == "handover":
        assert handover is not None
        socket.send_fds(handover, [b"\0"], [fd])
        os.close(fd)
        say("handed over")
    elif command == "read":
        say(str(first_byte(numbers[0])))
    elif command == "wait":
        threading.Thread(target=wait_for, args=(numbers[0],), daemon=True).start()
        say("waiting")
    elif command == "drop":
        checked(libc.madvise(where[numbers[0]], numbers[1] * PAGE, MADV_DONTNEED), "madvise")
        say("dropped")
    elif command == "unmap":
        checked(libc.munmap(where[numbers[0]], numbers[1] * PAGE), "munmap")
        where[numbers[0]:numbers[0] + numbers[1]] = [None] * numbers[1]
        say("unmapped")
    elif command == "move":
        move(numbers[0], numbers[1], "dontunmap" in args)
        say("moved")
    elif command == "protect":
        checked(libc.mprotect(where[numbers[0]], numbers[1] * PAGE, PROT_READ), "mprotect")
        say("protected")
    elif command == "crowd":
        say(f"crowded {crowd()}")
    elif command == "sum":
        digest = hashlib.sha256()
        for address in where:
            if address is not None:
                digest.update(ctypes.string_at(address, PAGE))
        say(digest.hexdigest())
sys.stdout.flush()
os._exit(0)  # no interpreter teardown: nothing more to unmap while a daemon may still hold the userfaultfd
