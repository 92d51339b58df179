"""The checkpoint worker: one container's checkpoint, done in a process of its own for a shim server
(shim.criu.offload has the server's side and the conversation).

The worker is forked from the fork server's checkpoint spare (shim.forkserver.criu_spare), which has this
path imported already, or started by the server as a fresh interpreter. It becomes what the server is
for CRIU (the server's environment, cgroups, its bundle as cwd, its log fifo), runs
shim.criu.checkpoint.Checkpointer with a reaper of its own (CRIU and runc are the worker's children),
answers, waits for what the dump left to do (removing a stopped task's runtime state), and exits.
It calls setsid first (a waiting worker before it takes a connection, with its event loop made: prepare()):
its session is what the server kills if it dies mid-dump.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import TYPE_CHECKING

from shim.background import BackgroundTasks
from shim.criu import offload

if TYPE_CHECKING:
    from shim.children.reaper import Reaper
    from shim.criu.rpc import Started

log = logging.getLogger(__name__)
CLEANUP_GRACE = 60.0  # for what the dump left to do after the answer (`runc delete` of a stopped task)
# CRIU's version, asked once by the fork server's checkpoint spare before it forks any worker (prefetch()):
# every server's first checkpoint would otherwise start a `criu swrk` only to ask it (tens of ms).
PREFETCHED_VERSION: list | None = None


def prefetch() -> None:
    """In the checkpoint spare, before any fork: ask CRIU its version once (a failure is left for the
    checkpoints to report)."""
    global PREFETCHED_VERSION
    from shim.children.reaper import Reaper
    from shim.criu.rpc import CriuRpc

    async def ask() -> list:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        return list(await CriuRpc(reaper).version())

    try:
        PREFETCHED_VERSION = asyncio.run(ask())
    except Exception as exc:  # noqa: BLE001 - CRIU missing or broken: each checkpoint says so
        log.debug("CRIU version not prefetched: %s", exc)


class Prepared:
    """What a waiting worker made before its job: its reaper, the `criu swrk` its dump will talk to (None when CRIU
    could not start: the checkpoint then says why), and the PATH that CRIU was started with (the network lock runs
    iptables-restore through it: a job with another PATH gets a CRIU started with the server's)."""

    def __init__(self, reaper: Reaper, criu: Started | None, path: str | None) -> None:
        self.reaper = reaper
        self.criu = criu
        self.path = path


PREPARED: Prepared | None = None


def prepare(*, ahead: bool = False) -> asyncio.Runner:
    """What a worker needs before its job, done by a waiting worker before it takes a connection (off the
    checkpoint's path): a session of its own and an event loop; with ahead (the fork server's checkpoint spare's
    waiting worker), also its reaper, a `criu swrk` waiting for the dump's request (its exec and start-up, about
    4 ms, off the path) and asyncio.to_thread's executor thread (the scan for external unix sockets)."""
    global PREPARED
    if os.getsid(0) != os.getpid():
        os.setsid()
    runner = asyncio.Runner()
    loop = runner.get_loop()
    if ahead:
        from shim.children.reaper import Reaper
        from shim.criu.rpc import CriuRpc

        reaper = Reaper()
        reaper.install(loop)
        try:
            criu = CriuRpc(reaper).start_ahead()
        except Exception as exc:  # noqa: BLE001 - CRIU missing: the checkpoint starts its own and says why
            log.debug("no criu swrk started ahead: %s", exc)
            criu = None
        runner.run(asyncio.to_thread(int))
        PREPARED = Prepared(reaper, criu, os.environ.get("PATH"))
    return runner


def main(fd: int, runner: asyncio.Runner | None = None) -> int:
    """Serve one job on the connected socket fd; the exit status (0: answered, whatever the answer).
    runner: from prepare(), when the worker made it while it waited."""
    conn = socket.socket(fileno=fd)
    try:
        with runner or prepare() as running:
            return running.run(_serve(conn))
    except Exception:  # noqa: BLE001 - the server sees EOF and reports a dead worker
        log.exception("checkpoint worker failed")
        return 1


async def _serve(conn: socket.socket) -> int:
    # The hello and the job, on the blocking socket before any stream is made: a server that found this worker
    # through the checkpoint spare sent the job with its connection, so it is there already.
    conn.sendall(offload.encode({"hello": os.getpid(), "protocol": offload.PROTOCOL}))
    message = _read_message(conn)
    if message is None or "job" not in message:
        return 1
    if _closed(conn):  # the server gave up waiting for the hello and started another worker: not ours to do
        return 1
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    job = message["job"]
    if job.get("protocol") != offload.PROTOCOL:
        writer.write(offload.encode({"error": {"kind": "Unavailable", "message": (
            f"the checkpoint worker speaks protocol {offload.PROTOCOL}, the shim server {job.get('protocol')}: "
            "pyshim was upgraded under a running shim; restart the container's shim to checkpoint it")}}))
        await writer.drain()
        return 1
    _become_server(job)
    paused = {"value": bool(job["paused"])}
    listening = asyncio.ensure_future(_listen(reader, paused))
    background = BackgroundTasks()  # the worker's own: what a dump leaves to finish after its answer
    try:
        result = await _checkpoint(job, paused, writer, background)
        writer.write(offload.encode({"result": result}))
        await writer.drain()
    except Exception as exc:  # noqa: BLE001 - every failure is the server's to report
        writer.write(offload.encode({"error": _error(exc)}))
        await writer.drain()
        return 0
    finally:
        listening.cancel()
    await background.close(CLEANUP_GRACE)
    writer.close()
    return 0


def _read_message(conn: socket.socket) -> dict | None:
    """One length-prefixed JSON message from a blocking socket (offload's framing); None at EOF or when malformed."""
    header = _read_exactly(conn, offload.HEADER)
    if header is None:
        return None
    length = int.from_bytes(header, "big")
    payload = _read_exactly(conn, length) if length <= offload.MAX_MESSAGE else None
    try:
        message = json.loads(payload) if payload is not None else None
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        try:
            chunk = conn.recv(left)
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _closed(conn: socket.socket) -> bool:
    """Whether the server has closed the connection (EOF waiting behind what was read)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _become_server(job: dict) -> None:
    """The server's environment, umask, cwd, log and cgroups: CRIU and runc run as if the server ran them."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in job["env"].items()})
    os.umask(int(job["umask"]))
    os.chdir(job["bundle"])
    from shim.server.shimlog import setup_logging

    setup_logging(job["bundle"], bool(job["debug"]), str(job.get("namespace") or ""))
    server_pid = int(job["server_pid"])
    if os.getppid() != server_pid:  # an exec'd worker is the server's child, in its cgroups already
        from shim.cgroups.procs import join_like

        criu = [PREPARED.criu.pid] if PREPARED is not None and PREPARED.criu is not None else []
        try:
            for pid in (os.getpid(), *criu):  # the worker, and the CRIU it started ahead
                for note in join_like(server_pid, pid):
                    log.warning("checkpoint worker: %s", note)
        except Exception as exc:  # noqa: BLE001 - placement is best effort, as the server's own
            log.warning("checkpoint worker: cgroups of the shim server not joined: %s", exc)
    try:
        from shim.forkserver import proctitle

        proctitle.set_comm(b"pyshim-ckpt")
    except OSError:
        pass


async def _listen(reader: asyncio.StreamReader, paused: dict) -> None:
    """The server's updates of the task's paused state, until it goes away."""
    while True:
        try:
            message = await offload.read_message(reader)
        except ValueError:
            return
        if message is None:
            return
        if "paused" in message:
            paused["value"] = bool(message["paused"])


async def _checkpoint(job: dict, paused: dict, writer, background: BackgroundTasks) -> dict:
    from shim.bundle.config import Bundle
    from shim.children.reaper import Reaper
    from shim.criu.checkpoint import Checkpointer, CriuDumper
    from shim.criu.options import CheckpointOptions, from_record
    from shim.criu.rpc import CriuRpc, CriuVersion
    from shim.oci.commands import RuntimeConfig
    from shim.oci.runner import Runner
    from shim.oci.runtime import OciRuntime

    prepared = PREPARED
    if prepared is not None:
        reaper = prepared.reaper
    else:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
    config = RuntimeConfig(**job["runtime"])
    runtime = OciRuntime(config, Runner(reaper, log_path=config.log))
    options = CheckpointOptions(**from_record(job["options"]), extra=dict(job.get("extra") or {})).validate()
    # The version known: the server learnt it from an earlier worker, or the spare asked (no `criu swrk` for it).
    known = job.get("criu_version") or PREFETCHED_VERSION
    rpc = CriuRpc(reaper)
    if prepared is not None and prepared.criu is not None:
        if prepared.path == os.environ.get("PATH"):
            rpc.adopt(prepared.criu)
        else:
            prepared.criu.close()  # it exits on EOF; the dump starts one with the server's PATH
    criu = CriuDumper(rpc, version=CriuVersion(*known) if known else None)
    checkpointer = Checkpointer(reaper, background, dumper=criu)
    result = await checkpointer.checkpoint(container_id=job["container_id"], bundle=Bundle.read(job["bundle"]),
                                           pid=int(job["pid"]), options=options, runtime=runtime,
                                           paused=lambda: paused["value"], token=job.get("token"))
    if result.completion is not None:  # a lazy dump: its page server is ready
        writer.write(offload.encode({"ready": _record(result, criu)}))
        await writer.drain()
        result = await result.completion
    return _record(result, criu)


def _record(result, criu) -> dict:
    return {"image_path": result.image_path, "engine": result.engine, "stats": dict(result.stats),
            "stopped": result.stopped, "network_lock": result.network_lock.as_record() if result.network_lock else None,
            "criu_version": list(criu.version) if criu.version else None}


def _error(exc: BaseException) -> dict:
    """An exception as the server raises it again: its kind (shim.errors) and its message."""
    from shim import errors

    kind = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in offload.KINDS), "ShimError")
    message = str(exc) if isinstance(exc, errors.ShimError) else f"checkpoint failed: {type(exc).__name__}: {exc}"
    return {"kind": kind, "message": message}
