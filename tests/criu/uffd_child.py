"""A process whose memory comes lazily, for the lazy-pages daemon's tests: it maps PAGES pages, registers them with
a userfaultfd of its own (user mode only: no privileges needed), and obeys lines on stdin:

  register DIR PID   hand the userfaultfd to the daemon listening in DIR, as `criu restore --lazy-pages` does
  finish             say the restore has finished, as CRIU does after its last process
  read N             print page N's first byte (faulting on it if it has not come)
  drop N COUNT       madvise(MADV_DONTNEED) pages N.. (the daemon gets a REMOVE event)
  sum                print the sha256 of all the pages
"""

import ctypes
import hashlib
import mmap
import os
import platform
import socket
import struct
import sys

PAGE = 4096
USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_USER_MODE_ONLY = 1
UFFDIO_API, UFFDIO_REGISTER = 0xC018AA3F, 0xC020AA00
FEATURES = 1 << 1 | 1 << 3 | 1 << 4  # EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP (EVENT_FORK needs privileges)

libc = ctypes.CDLL(None, use_errno=True)
pages = int(sys.argv[1])
region = mmap.mmap(-1, pages * PAGE)
address = ctypes.addressof(ctypes.c_char.from_buffer(region))
fd = libc.syscall(USERFAULTFD[platform.machine()], os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
if fd < 0:
    print("refused", ctypes.get_errno(), flush=True)
    sys.exit(0)
api = (ctypes.c_uint64 * 3)(0xAA, FEATURES, 0)
register = (ctypes.c_uint64 * 4)(address, pages * PAGE, 1, 0)  # mode MISSING
for request, argument in ((UFFDIO_API, api), (UFFDIO_REGISTER, register)):
    if libc.ioctl(fd, ctypes.c_ulong(request), argument) != 0:
        print("refused", ctypes.get_errno(), flush=True)
        sys.exit(0)
print("ready", address, flush=True)
daemon = None
for line in sys.stdin:
    command, *args = line.split()
    if command == "register":
        os.chdir(args[0])
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect("lazy-pages.socket")
        daemon.sendall(struct.pack("=i", int(args[1])))
        socket.send_fds(daemon, [b"\0"], [fd])
        os.close(fd)  # the daemon's now, as a restored process keeps none
        print("registered", flush=True)
    elif command == "finish":
        assert daemon is not None
        daemon.sendall(struct.pack("=I", 0x52535446))
        daemon.close()
        print("finished", flush=True)
    elif command == "read":
        print(region[int(args[0]) * PAGE], flush=True)
    elif command == "drop":
        region.madvise(mmap.MADV_DONTNEED, int(args[0]) * PAGE, int(args[1]) * PAGE)
        print("dropped", flush=True)
    elif command == "sum":
        print(hashlib.sha256(region[:]).hexdigest(), flush=True)
