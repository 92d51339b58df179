"""The fork server as `start` sees it: hand the bound socket over, or launch a server for next time.

Standard library only (`start` runs it on containerd's hot path); fcntl is imported only to launch.
"""

from __future__ import annotations

import _socket
import os
import sys

from shim.forkserver import wire
from shim.forkserver.wire import enabled

__all__ = ["EXCHANGE_TIMEOUT", "Target", "enabled", "hand_over", "launch", "request_fields", "server_command"]

# The whole exchange: connect, request, the child's "ready", our "go". A fork server answers in
# milliseconds; past this `start` forks the server itself (the child is told nothing and exits).
EXCHANGE_TIMEOUT = 2.0


class Target:
    """Which fork server this `start` would use: the code's digest and the containerd process."""

    def __init__(self, containerd_pid: int, directory: str | None = None) -> None:
        self.directory = directory or wire.run_dir()
        self.containerd_pid = containerd_pid
        self.containerd_start = wire.process_start_time(containerd_pid) or 0
        self.digest = wire.source_digest()
        self.key = wire.server_key(self.digest, containerd_pid, self.containerd_start)
        self.socket_path = wire.socket_path(self.directory, self.key)
        self.lock_path = wire.lock_path(self.directory, self.key)


def request_fields(bundle: str, options: bytes, containerd_pid: int, digest: str) -> list[tuple[str, bytes]]:
    fields: list[tuple[str, bytes]] = [("digest", digest.encode()), ("cwd", os.fsencode(bundle)),
                                       ("containerd_pid", str(containerd_pid).encode()), ("options", options)]
    umask = os.umask(0)
    os.umask(umask)
    fields.append(("umask", str(umask).encode()))
    fields += [("argv", os.fsencode(arg)) for arg in sys.argv]
    # What /proc/PID/cmdline of the server shows: the interpreter's own argv, as for a forked `start`.
    fields += [("cmdline", os.fsencode(arg)) for arg in getattr(sys, "orig_argv", sys.argv)]
    fields += [("env", key + b"=" + value) for key, value in os.environb.items()]
    return fields


def hand_over(target: Target, listener: _socket.socket, bundle: str, options: bytes) -> int | None:
    """Ask the fork server to fork this shim's server on listener; the server's pid, or None when no fork
    server took it (none running, not ours, an error, too slow): the caller then forks it itself."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.settimeout(EXCHANGE_TIMEOUT)
    try:
        try:
            conn.connect(target.socket_path)
        except OSError:
            return None  # none running (yet): the common first-container case
        _, uid, _ = wire.peer_credentials(conn)
        if not wire.trusted_uid(uid):
            return None
        wire.send_frame(conn, wire.encode(request_fields(bundle, options, target.containerd_pid, target.digest)),
                        [listener.fileno()])
        reply, fds = wire.recv_frame(conn)
        if wire.first(reply, "status", b"") != b"ready":
            return None
        pid = int(wire.first(reply, "pid"))
        wire.send_frame(conn, wire.encode([("status", b"go")]))
        return pid
    except (OSError, ValueError):
        return None  # the child (if any) gets no "go" and exits without serving
    finally:
        conn.close()


def server_command() -> list[str]:
    """How this process was started, up to and including the script or module: the same launcher (and so
    the same interpreter flags and sys.path) runs the fork server."""
    orig = list(getattr(sys, "orig_argv", []))
    cut = len(orig) - len(sys.argv) + 1
    if not orig or cut < 1:
        return [sys.executable, sys.argv[0]]
    return orig[:cut]


def launch(target: Target, command: list[str] | None = None) -> int | None:
    """Start a fork server in the background (new session, stdio on /dev/null, cwd /), unless one holds the
    lock (running or starting). Returns its pid, or None when none was started. It is our child only until
    `start` exits."""
    import fcntl

    try:
        os.makedirs(target.directory, mode=0o700, exist_ok=True)
        lock = os.open(target.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # a server for this key is running or starting
        try:
            if os.stat(target.lock_path).st_ino != os.fstat(lock).st_ino:
                return None  # a server removed it while exiting; the next start tries again
        except OSError:
            return None
        argv = [*(command or server_command()), "forkserver", str(target.containerd_pid),
                str(target.containerd_start), target.digest, str(lock)]
        os.set_inheritable(lock, True)
        null = os.open(os.devnull, os.O_RDWR)
        try:
            return os.posix_spawn(sys.executable, argv, os.environ, setsid=True,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)])
        except OSError:
            return None
        finally:
            os.close(null)
    finally:
        os.close(lock)
