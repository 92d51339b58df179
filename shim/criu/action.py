"""CRIU action script run during a restore (named in the CRIU configuration pyshim writes).

At `setup-namespaces` the restored tree's namespaces exist but no socket has been restored:
pyshim brings the loopback interface of the new network namespace up here. runc restores a
container's private network namespace with `lo` down (containerd#4683, CRIU#590), and a
server reached at 127.0.0.1 by its own processes is then unreachable.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000


def loopback_up(pid: int) -> None:
    """Set `lo` up in the network namespace of pid (this process joins it; it is short-lived)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid}")
    finally:
        os.close(fd)
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        index = ip.link_lookup(ifname="lo")
        if index:
            ip.link("set", index=index[0], state="up")


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
