"""The fork server's checkpoint spare: a process with the checkpoint path imported (pycriu's messages,
pycriu.images, shim.criu.*), which forks one checkpoint worker per request (shim.criu.worker).

Shim servers never import that path (shim.criu.offload): a server that checkpointed stays at its idle
RSS. The spare pays the imports once per fork server, off every request's path; a worker forked from it
starts a checkpoint at once. It is forked by the fork server like a shim spare (double fork, own session,
every descriptor closed but its socket to the fork server) and exits when the fork server does (EOF).
Its workers are its children, reaped on SIGCHLD; a worker outlives it if it must (re-parented).
"""

from __future__ import annotations

import gc
import os
import signal

from shim.forkserver import wire

TOKEN = "forkserver-criu"  # in its command line instead of "forkserver"
# What a checkpoint imports (the restore path is the server's: restores run there).
PRELOAD = ("shim.criu.checkpoint", "shim.criu.worker", "pycriu.images", "shim.oci.runtime", "shim.cgroups.procs")


def main(sock, close_all_but, mark) -> None:
    """The spare's life: never returns. close_all_but and mark come from the fork server (its helpers)."""
    try:
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        close_all_but({0, 1, 2, sock.fileno()})
        os.chdir("/")
        mark(TOKEN)
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
        signal.signal(signal.SIGCHLD, _reap)
        sock.setblocking(True)
        while True:
            try:
                _, fds = wire.recv_frame(sock, max_fds=1)
            except (OSError, ValueError):
                return  # the fork server is gone
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            _fork_worker(sock, fds[0])
    except BaseException:
        pass
    finally:
        os._exit(0)


def _fork_worker(sock, conn_fd: int) -> None:
    try:
        pid = os.fork()
    except OSError:
        os.close(conn_fd)  # the server sees EOF before a hello and starts a worker itself
        return
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sock.close()
            from shim.criu.worker import main as worker_main

            code = worker_main(conn_fd)
        finally:
            os._exit(code)
    os.close(conn_fd)


def _reap(signum, frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
