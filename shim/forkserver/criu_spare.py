"""The fork server's checkpoint spare: a process with the checkpoint path imported (pycriu's messages,
pycriu.images, shim.criu.*) that keeps one checkpoint worker (shim.criu.worker) forked in advance.

Shim servers never import that path (shim.criu.offload): a server that checkpointed stays at its idle
RSS. The spare pays the imports once per fork server, off every request's path. It listens on its own
socket, `forkserver-<key>-criu.sock` beside the fork server's (the key names the code and the containerd,
so a server reaching it runs the same code); the worker it forked in advance waits in accept() on it, so
a server's connection is taken by a ready worker at once, with no process in between. Once a worker has
a connection it tells the spare (a byte on a pipe), and the spare forks the next one.

The spare is forked by the fork server like a shim spare (double fork, own session, every descriptor
closed but its socket to the fork server) and exits when the fork server does (EOF), removing its socket.
Its workers are its children, reaped on SIGCHLD; a worker outlives it if it must (re-parented).
"""

from __future__ import annotations

import gc
import os
import select
import signal

from shim.forkserver import wire

TOKEN = "forkserver-criu"  # in its command line instead of "forkserver"
# What a checkpoint imports (the restore path is the server's: restores run there).
PRELOAD = ("shim.criu.checkpoint", "shim.criu.worker", "pycriu.images", "shim.oci.runtime", "shim.cgroups.procs",
           "concurrent.futures.thread")  # asyncio.to_thread's executor (the scan for external unix sockets)
RETRY = 1.0  # seconds before forking a waiting worker again after one died unused, or a fork failed


def socket_path(directory: str, key: str) -> str:
    return wire.socket_path(directory, f"{key}-criu")


def main(sock, path: str) -> None:
    """The spare's life, once the fork server has detached it (shim.forkserver.server._detach): never returns."""
    listener, inode = None, 0
    try:
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass  # no pycriu: each checkpoint reports it
        try:
            from shim.criu.worker import prefetch

            prefetch()
        except ImportError:
            pass
        gc.collect()
        gc.freeze()
        listener = _listen(path)
        inode = os.stat(path).st_ino  # ours to remove at the end only while it is still this socket
        _serve(sock, listener)
    except BaseException:
        pass
    finally:
        if listener is not None:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        os._exit(0)


def _listen(path: str):
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)  # one a killed spare of this fork server left: the fork server's lock makes it ours
    except FileNotFoundError:
        pass
    old = os.umask(0o177)  # the socket is never reachable by others, not even between bind and chmod
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def _serve(sock, listener) -> None:
    """Keep one worker waiting in accept(); fork the next when it takes a connection or dies unused."""
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    waiting = None
    retry_at = 0.0
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake poll(); reaped below
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(taken_r, select.POLLIN)
    import time

    while True:
        for pid in _reap():
            if pid == waiting and not select.select([taken_r], [], [], 0)[0]:
                # It died before it took a connection: fork another, but not in a loop.
                waiting, retry_at = None, time.monotonic() + RETRY
        if waiting is None and time.monotonic() >= retry_at:
            try:
                waiting = _fork_waiting(sock, listener, taken_r, taken_w)
            except OSError:
                retry_at = time.monotonic() + RETRY
        try:
            events = poller.poll(RETRY * 1000)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == sock.fileno():
                return  # the fork server is gone (EOF)
            if fd == taken_r:
                os.read(taken_r, 64)
                waiting = None  # it has a connection now: the next one is forked at the top of the loop


def _fork_waiting(sock, listener, taken_r: int, taken_w: int) -> int:
    spare = os.getpid()  # taken before the fork: the spare may be gone before the child runs at all
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # Waiting, it must not outlive the spare (nothing would ever end its accept()); working, it must.
        _parent_death_signal(signal.SIGKILL)
        if os.getppid() != spare:
            return  # type: ignore[return-value]  # never returns: the finally below exits (code 1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        os.close(taken_r)
        from shim.criu.worker import main as worker_main
        from shim.criu.worker import prepare

        runner = prepare(ahead=True)  # its session, event loop and CRIU, made now rather than on the checkpoint's path
        while True:
            conn, _ = listener.accept()
            if wire.trusted_uid(wire.peer_credentials(conn)[1]):
                break
            conn.close()  # another uid: not ours to serve
        _parent_death_signal(0)
        listener.close()
        os.write(taken_w, b"1")
        os.close(taken_w)
        code = worker_main(conn.detach(), runner)
    finally:
        os._exit(code)


def _parent_death_signal(signum: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _reap() -> list[int]:
    reaped: list[int] = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)
