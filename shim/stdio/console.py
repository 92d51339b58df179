"""The pty side of terminal processes: the console socket and the master's window size.

With a terminal, runc allocates the pty itself and hands the master to whoever listens on
--console-socket: it connects to the unix socket and sends one message whose data is the pty's
name and whose SCM_RIGHTS carries the master fd. The socket lives in a private temporary
directory (0700), is good for one connection, and is removed once the master has arrived.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios

from shim.fdwait import readable
from shim.stdio.errors import StdioError

_MAX_NAME = 4096


class ConsoleSocket:
    def __init__(self) -> None:
        # Like runc's own helper: under XDG_RUNTIME_DIR when set (rootless), else the temp dir.
        self.dir = tempfile.mkdtemp(prefix="pty", dir=os.environ.get("XDG_RUNTIME_DIR") or None)
        self.path = os.path.join(self.dir, "pty.sock")
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._sock = sock
            sock.bind(self.path)
            sock.listen(1)
            sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise StdioError(f"cannot listen on console socket {self.path}: {exc.strerror}") from exc

    async def receive_master(self, timeout: float) -> tuple[int, str]:
        """Accept the runtime's connection and return (master fd, pty name). Bounded by timeout."""
        if self._sock is None:
            raise StdioError(f"console socket {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._sock)
                with conn:
                    return await _receive_fd(conn, self.path)
        except TimeoutError:
            raise StdioError(f"the OCI runtime sent no console on {self.path} within {timeout:g}s") from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        shutil.rmtree(self.dir, ignore_errors=True)


async def _receive_fd(conn: socket.socket, path: str) -> tuple[int, str]:
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, _MAX_NAME, 1, socket.MSG_CMSG_CLOEXEC)
            break
        except BlockingIOError:
            await readable(conn.fileno())
    name = data.decode(errors="replace")
    if not fds:
        raise StdioError(f"the OCI runtime connected to {path} but sent no pty master")
    master = fds[0]
    for extra in fds[1:]:
        os.close(extra)
    if flags & socket.MSG_CTRUNC or not os.isatty(master):
        os.close(master)
        raise StdioError(f"the OCI runtime sent something other than one pty master on {path}")
    os.set_blocking(master, False)
    return master, name


def set_window_size(fd: int, width: int, height: int) -> None:
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        raise StdioError(f"window size {width}x{height} is out of range (0..65535)")
    # struct winsize: rows, columns, x pixels, y pixels
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    """(width, height) of a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return cols, rows
