"""CRIU action script run during a restore (named in the CRIU configuration pyshim writes).

At `setup-namespaces` the restored tree's namespaces exist but no socket has been restored:
pyshim brings the loopback interface of the new network namespace up here. runc restores a
container's private network namespace with `lo` down (containerd#4683, CRIU#590), and a
server reached at 127.0.0.1 by its own processes is then unreachable.

CRIU runs the script at every stage of a restore (pre-restore, setup-namespaces, ... seven in
all) while the container is down, so the other stages return before importing anything, and
`lo` is raised with one ioctl rather than through pyroute2, whose import alone takes ~130 ms.
"""

from __future__ import annotations

import os
import sys

CLONE_NEWNET = 0x40000000
# <linux/sockios.h>, <net/if.h>: the ioctls `ifconfig lo up` uses.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq: the interface name, then a union (40 bytes in all) whose member here is short ifr_flags.
IFREQ_FLAGS_FORMAT = "16sH22x"


def loopback_up(pid: int) -> None:
    """Set `lo` up in the network namespace of pid (this process joins it; it is short-lived)."""
    # _socket, not socket: the wrapper module imports enum and selectors, 8 of this script's ms.
    import _socket
    import fcntl
    import struct

    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, CLONE_NEWNET, pid)
    finally:
        os.close(fd)
    ifreq = struct.Struct(IFREQ_FLAGS_FORMAT)
    # A socket belongs to the network namespace it is created in: this one is created after setns.
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        _, flags = ifreq.unpack(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq.pack(b"lo", 0)))
        if not flags & IFF_UP:
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, ifreq.pack(b"lo", flags | IFF_UP))
    finally:
        sock.close()


def _setns(fd: int, nstype: int, pid: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, nstype)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid}")


def main() -> int:
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action != "setup-namespaces":
        return 0
    pid = int(os.environ.get("CRTOOLS_INIT_PID", "0"))
    if pid <= 0:
        print("pyshim criu action: no CRTOOLS_INIT_PID", file=sys.stderr)
        return 1
    try:
        loopback_up(pid)
    except OSError as exc:
        print(f"pyshim criu action: loopback of {pid} not raised: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
