"""The shim server process: logging to containerd, the reaper, the task service, ttrpc.

Forked by `start` after the socket is bound (or started with the socket as fd 3, the way
the Go shim re-executes itself). It lives until containerd calls Shutdown with no task
left, or until SIGTERM.
"""

from __future__ import annotations

import shim.server.notls  # noqa: F401  # first: asyncio without ssl (see shim/server/notls.py)

# isort: split
import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from shim.actions.cmdline import ShimArgs
from shim.server.shimlog import setup_logging

log = logging.getLogger("shim")
INHERITED_SOCKET_FD = 3
SHUTDOWN_GRACE = 3.0


def adjust_oom_score(containerd_pid: int | None) -> None:
    """One point above containerd's own score, as the Go shim sets it: under memory
    pressure a shim goes before containerd."""
    if not containerd_pid:
        return
    try:
        with open(f"/proc/{containerd_pid}/oom_score_adj") as f:
            score = int(f.read().strip())
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except (OSError, ValueError) as exc:
        log.debug("oom_score_adj not adjusted: %s", exc)


def join_cgroup(options: bytes) -> None:
    """Move the shim into Options.shim_cgroup when containerd asked for one."""
    if not options:
        return
    from google.protobuf.any_pb2 import Any

    from shim.task.convert import runtime_options

    try:
        cgroup = runtime_options(Any.FromString(options)).shim_cgroup
    except Exception as exc:
        log.warning("ignoring unreadable start options: %s", exc)
        return
    if cgroup:
        from shim.cgroups import join

        join(cgroup, os.getpid())


def serve(args: ShimArgs, sock: socket.socket, bundle: str, options: bytes = b"",
          containerd_pid: int | None = None, origin: str = "", notes: Sequence[str] = ()) -> int:
    """Serve until Shutdown or SIGTERM. origin says how this process came to be (logged); notes are
    warnings from before logging was set up."""
    setup_logging(bundle, args.debug, args.namespace)
    for note in notes:
        log.warning("%s", note)
    adjust_oom_score(containerd_pid)
    try:
        join_cgroup(options)
    except Exception as exc:
        log.warning("could not join the shim cgroup: %s", exc)
    # The Go shim's "starting signal loop" line carries the bundle as `path`; this one does too.
    log.info("pyshim serving namespace %s id %s (pid %d, %s)", args.namespace, args.id, os.getpid(),
             origin or "forked by start", extra={"fields": {"path": bundle}})
    try:
        asyncio.run(_serve(args, sock, containerd_pid))
    except Exception:
        log.exception("shim failed")
        return 1
    return 0


def serve_inherited(args: ShimArgs) -> int:
    """Serve on a listening socket passed as fd 3 (the Go shim's re-exec convention)."""
    sock = socket.socket(fileno=INHERITED_SOCKET_FD)
    return serve(args, sock, os.getcwd(), origin="socket inherited as fd 3")


async def _serve(args: ShimArgs, sock: socket.socket, containerd_pid: int | None = None) -> None:
    from shim.api.containerd.task.v2 import shim_pb2 as v2
    from shim.api.containerd.task.v3 import shim_pb2 as v3
    from shim.background import BackgroundTasks
    from shim.children.reaper import Reaper
    from shim.criu.access import CriuAccess
    from shim.process.base import Stdio
    from shim.server.events import Publisher
    from shim.stdio import ProcessIO, open_process_io
    from shim.task.service import TaskService
    from shim.ttrpc import Server

    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    background = BackgroundTasks()  # the server's one owner of work that outlives a call; drained at shutdown
    stop = asyncio.Event()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{args.address}.ttrpc"
    publisher = Publisher(ttrpc_address, args.namespace)

    async def io_factory(stdio: Stdio, container_id: str, uid: int, gid: int) -> ProcessIO:
        return await open_process_io(stdio, reaper=reaper, background=background, uid=uid, gid=gid,
                                     container_id=container_id, namespace=args.namespace)

    criu = CriuAccess(reaper, background, containerd_pid=containerd_pid, namespace=args.namespace)
    service = TaskService(namespace=args.namespace, reaper=reaper, publisher=publisher, io_factory=io_factory,
                          background=background, stats=_stats_reader(), oom_watcher=_oom_watcher,
                          checkpointer=criu, restorer=criu, on_shutdown=stop.set)
    server = Server()
    server.register(v2.DESCRIPTOR.services_by_name["Task"], service)
    server.register(v3.DESCRIPTOR.services_by_name["Task"], service)
    path = sock.getsockname()  # read now: the listener is closed by shutdown
    await server.listen(sock)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown(grace=SHUTDOWN_GRACE)
    await background.close(grace=SHUTDOWN_GRACE)  # before the publisher: what still runs may publish
    await publisher.close()
    if isinstance(path, str) and path.startswith("/"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _oom_watcher(pid: int) -> AsyncGenerator[int, None]:
    from shim.cgroups import find_cgroup, watch_oom

    return watch_oom(find_cgroup(pid))


def _stats_reader() -> Callable[[int], Any]:
    from shim.cgroups import metrics_for_pid

    return metrics_for_pid
