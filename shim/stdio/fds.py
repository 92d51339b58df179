"""File descriptors the stdio layer owns: the runtime's pipes and the client-side fifo and file ends.

Every fd is wrapped in an Fd so it is closed exactly once: closing a number twice could close an
unrelated fd that reused it. Ends the event loop drives are made non-blocking; ends handed to the
runtime or a logger stay blocking, because their readers and writers expect ordinary stdio (and
O_NONBLOCK belongs to the open file, which a dup or fork shares).
"""

from __future__ import annotations

import logging
import os
import stat

from shim.stdio.errors import StdioError

log = logging.getLogger(__name__)


class Fd:
    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:  # nothing left to do about it, but worth knowing
                log.warning("closing %s (fd %d): %s", self.name, fd, exc)

    def __repr__(self) -> str:
        return f"Fd({self.fd}, {self.name!r})"


def runtime_pipe(stream: str, *, uid: int, gid: int, nonblocking: bool = True) -> tuple[Fd, Fd]:
    """A pipe between the shim and the runtime's fd for `stream`: returns (ours, theirs).

    For stdin the runtime reads and we write; for stdout/stderr the other way round. The
    runtime's end is given to io_uid/io_gid, so a container user can reopen /proc/self/fd/N.
    Our end is non-blocking unless it is meant for a logger rather than the event loop.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    if stream == "stdin":
        ours, theirs = Fd(write_end, f"{stream} pipe (shim end)"), Fd(read_end, f"{stream} pipe (runtime end)")
    else:
        ours, theirs = Fd(read_end, f"{stream} pipe (shim end)"), Fd(write_end, f"{stream} pipe (runtime end)")
    try:
        os.set_blocking(ours.fd, not nonblocking)
        owner = os.fstat(theirs.fd)
        if (owner.st_uid, owner.st_gid) != (uid, gid):  # fchown to ourselves would need no privilege anyway
            os.fchown(theirs.fd, uid, gid)
    except OSError as exc:
        ours.close()
        theirs.close()
        raise StdioError(f"cannot give the {stream} pipe to uid {uid} gid {gid}: {exc.strerror}") from exc
    return ours, theirs


def plain_pipe(name: str) -> tuple[Fd, Fd]:
    """(read end, write end), both blocking and close-on-exec."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return Fd(read_end, f"{name} (read end)"), Fd(write_end, f"{name} (write end)")


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise StdioError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise StdioError(f"{what} {path}: {exc.strerror}") from exc


def _open(path: str, flags: int, what: str, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise StdioError(f"cannot open {what} {path}: {exc.strerror}") from exc


def open_input_fifo(path: str, stream: str = "stdin") -> tuple[Fd, Fd]:
    """Open the client's stdin fifo without blocking: returns (reader, keepalive writer).

    A fifo reader sees end of file whenever no writer is open, including before the client
    opens its end and between two clients (ctr attach). The shim therefore holds a writer of its
    own; closing it (CloseIO) lets end of file through once the client's writers are gone too,
    after everything they wrote has been read.
    """
    if not stat.S_ISFIFO(_stat(path, f"{stream} fifo").st_mode):
        raise StdioError(f"{stream} {path} is not a fifo")
    reader = Fd(_open(path, os.O_RDONLY | os.O_NONBLOCK, f"{stream} fifo"), f"{stream} fifo {path} (reader)")
    try:
        # Cannot fail with ENXIO: we are a reader ourselves.
        keepalive = Fd(_open(path, os.O_WRONLY | os.O_NONBLOCK, f"{stream} fifo"),
                       f"{stream} fifo {path} (shim writer)")
    except BaseException:
        reader.close()
        raise
    return reader, keepalive


def open_output(path: str, stream: str) -> list[Fd]:
    """Open an output destination given as a path; the first Fd is the one to write to.

    A fifo is opened for reading by the shim first, which makes the non-blocking open for
    writing succeed whether or not the client has opened its end yet, and keeps writes from
    failing with EPIPE whenever the client goes away (once the fifo is full the copy waits, which
    is the backpressure we want). Anything else (a regular file) is appended to, as upstream does.
    """
    if stat.S_ISFIFO(_stat(path, f"{stream} fifo").st_mode):
        keepalive = Fd(_open(path, os.O_RDONLY | os.O_NONBLOCK, f"{stream} fifo"),
                       f"{stream} fifo {path} (shim reader)")
        try:
            writer = Fd(_open(path, os.O_WRONLY | os.O_NONBLOCK, f"{stream} fifo"), f"{stream} fifo {path} (writer)")
        except BaseException:
            keepalive.close()
            raise
        return [writer, keepalive]
    return [Fd(_open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK, stream), f"{stream} file {path}")]


def open_log_file(path: str, stream: str) -> Fd:
    """file:// destinations: created, with their directories, and appended to."""
    try:
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StdioError(f"cannot create the directory of {stream} log file {path}: {exc.strerror}") from exc
    return Fd(_open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, f"{stream} log file"), f"{stream} log file {path}")


def open_null() -> Fd:
    return Fd(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), os.devnull)
