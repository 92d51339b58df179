"""`lo` up in the network namespace a restore creates, at CRIU's setup-namespaces stage.

runc restores a container's private network namespace with `lo` down (containerd#4683, CRIU#590), and a server its
own processes reach at 127.0.0.1 is then unreachable. CRIU runs the action script named in its configuration at every
stage of a restore (seven in all, while the container is down). The script pyshim names is a few lines of sh: at
setup-namespaces (the restored tree's namespaces exist, no socket is restored yet) it hands the tree's pid to the
shim through a fifo and waits for the answer on another; at every other stage it exits at once. The shim raises `lo`
itself, with one ioctl on a socket made inside that namespace by a short-lived thread. The stage then costs a shell
and a round trip, not an interpreter start-up (a Python script took 14-20 ms there).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shlex
import socket
import struct

from shim.criu import images
from shim.netns.enter import socket_in

log = logging.getLogger(__name__)

SCRIPT, REQUEST, REPLY = "pyshim-criu-action", "lo-request", "lo-reply"
# <linux/sockios.h>, <net/if.h>: the ioctls `ifconfig lo up` uses.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq: the interface name, then a union (40 bytes in all) whose member here is short ifr_flags.
IFREQ = struct.Struct("16sH22x")


def raise_loopback(pid: int) -> None:
    """Set `lo` up in the network namespace of pid."""
    with socket_in(f"/proc/{pid}/ns/net", socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def script_text(request: str, reply: str) -> str:
    request, reply = shlex.quote(request), shlex.quote(reply)
    return (
        "#!/bin/sh\n"
        "# pyshim: CRIU runs this at every restore stage; at setup-namespaces the shim raises lo of the new netns.\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] || exit 0\n'
        f'echo "$CRTOOLS_INIT_PID" > {request} || exit 1\n'
        f'read -r answer < {reply} || answer="no answer from the shim"\n'
        '[ "$answer" = ok ] && exit 0\n'
        'echo "pyshim: lo of the restored tree (pid $CRTOOLS_INIT_PID) not raised: $answer" >&2\n'
        "exit 1\n"
    )


class LoopbackHook:
    """The shim's end of the action script, for one restore: fifos in a private directory, served by the running
    event loop until close(). `script` is the path to name in CRIU's configuration."""

    def __init__(self, directory: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._paths = [os.path.join(directory, name) for name in (REQUEST, REPLY)]
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by an earlier restore with the same work path
            os.mkfifo(path, 0o600)
        # O_RDWR on both: neither open blocks, the request end never reads EOF between writers, and a reply written
        # before the script opens its end waits in the pipe.
        self._request = os.open(self._paths[0], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._reply = os.open(self._paths[1], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending = b""
        self._answers: set[asyncio.Task] = set()
        self.raised: list[int] = []  # pids whose namespace got `lo` up
        self.script = os.path.join(directory, SCRIPT)
        images.write_private(self.script, script_text(*self._paths).encode())
        os.chmod(self.script, 0o700)
        self._loop.add_reader(self._request, self._readable)

    def _readable(self) -> None:
        try:
            self._pending += os.read(self._request, 256)
        except BlockingIOError:
            return
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            task = self._loop.create_task(self._answer(line))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)

    async def _answer(self, line: bytes) -> None:
        try:
            pid = int(line)
            if pid <= 0:
                raise ValueError
        except ValueError:
            answer = f"not a pid: {line[:40]!r}"
        else:
            try:
                await asyncio.to_thread(raise_loopback, pid)
                self.raised.append(pid)
                answer = "ok"
            except Exception as exc:  # noqa: BLE001 - told to CRIU through the script, which fails the restore
                answer = str(exc) or type(exc).__name__
                log.warning("restore: lo of pid %d not raised: %s", pid, answer)
        os.write(self._reply, (" ".join(answer.split()) + "\n").encode())

    def close(self) -> None:
        self._loop.remove_reader(self._request)
        for task in self._answers:
            task.cancel()
        os.close(self._request)
        os.close(self._reply)
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
