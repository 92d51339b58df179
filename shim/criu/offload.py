"""Checkpoints run in a worker process, so the long-lived shim server never imports CRIU's code.

A checkpoint needs pycriu's messages, pycriu.images and the whole of shim.criu: about 3 MiB of RSS and
22 ms of imports that a server would keep for the rest of its life after its first checkpoint. Here the
server only talks to a worker (shim.criu.worker) that does the checkpoint and answers with its result:

- through the fork server (docs/forkserver.md): it keeps a *checkpoint spare* that has the CRIU path
  imported already, and forks one worker per checkpoint from it, so the first checkpoint pays no imports;
- otherwise (no fork server for this containerd and code, or it refused) a fresh interpreter started by
  the server as its child, which pays the imports itself but still leaves the server as it was.

The conversation is length-prefixed JSON over a unix stream socket: the server sends the job, then the
task's paused state whenever it changes (a failed dump re-freezes or thaws the task by it); the worker
answers "hello", then "ready" (a lazy dump's page server is up) and "result" or "error". A worker that
ends without answering is a failed checkpoint: its session (CRIU with it) is killed, the task is resumed
or left paused as it was, and the error says which worker died. This module imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shim import errors
from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.children.proctree import session_of
from shim.children.reaper import Reaper

if TYPE_CHECKING:
    from shim.criu.netlock import Lock
    from shim.criu.options import CheckpointOptions
    from shim.oci.runtime import OciRuntime

log = logging.getLogger(__name__)
PROTOCOL = 1  # bumped whenever a message changes: a worker of other code refuses the job
HEADER = 4
MAX_MESSAGE = 1 << 20
HELLO_TIMEOUT = 10.0  # connect, fork (or exec: an interpreter's start-up and imports) and the first answer
PAUSED_POLL = 0.2  # how often the task's paused state is compared with what the worker was last told
WORKER_FD = 3  # the conversation socket in an exec'd worker
WORKER_STATEMENT = "from shim.criu.worker import main; sys.exit(main(3))"  # run by spawn.python_argv
# Exceptions a worker reports by name, raised again here as the same kind (the task service maps kinds to codes).
KINDS = {cls.__name__: cls for cls in (errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition,
                                       errors.InvalidArgument, errors.Unavailable, errors.Interrupted)}


class WorkerGone(errors.Interrupted):
    """The worker ended (killed, crashed) before it answered; its CRIU was killed with it and the task resumed or
    re-paused as it was (whether every process of it survived CRIU's death is its owner's to say)."""


def encode(message: dict) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return len(payload).to_bytes(HEADER, "big") + payload


async def read_message(reader: asyncio.StreamReader) -> dict | None:
    """The next message; None at EOF (the peer ended). Raises ValueError on a malformed one."""
    try:
        header = await reader.readexactly(HEADER)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("connection closed mid-message") from None
        return None
    except ConnectionResetError:
        return None
    length = int.from_bytes(header, "big")
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
    try:
        payload = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        raise ValueError("connection closed mid-message") from None
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("message is not an object")
    return message


class Checkpointed:
    """What a worker's checkpoint gave: the fields of shim.criu.checkpoint.CheckpointResult."""

    def __init__(self, record: dict, completion: asyncio.Future[Checkpointed] | None = None) -> None:
        self.image_path = str(record.get("image_path", ""))
        self.engine = str(record.get("engine", ""))
        self.stats = {str(k): int(v) for k, v in (record.get("stats") or {}).items()}
        self.stopped = bool(record.get("stopped"))
        self.network_lock: Lock | None = None
        if record.get("network_lock"):
            from shim.criu.netlock import Lock

            self.network_lock = Lock.from_record(record["network_lock"])
        self.completion = completion


class Worker:
    """One connected worker: its pid (a pidfd held, so a reused pid is never signalled), its streams."""

    def __init__(self, reader, writer, pid: int, how: str, exited: asyncio.Future | None) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = pid
        self.how = how  # "forked by the fork server's checkpoint spare" / "started by the shim"
        self.exited = exited  # the reaper's report, for a worker that is our child
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    def send(self, message: dict) -> None:
        self.writer.write(encode(message))

    def close(self) -> None:
        self.writer.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def kill_session(self) -> None:
        """SIGKILL the worker and everything in its session (CRIU; the worker calls setsid first)."""
        if self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in session_members(self.pid):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if session_of(pid) == self.pid:  # checked again under the pidfd: not a reused pid
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)

    def describe(self) -> str:
        return f"checkpoint worker pid {self.pid} ({self.how})"


class OffloadedCheckpointer:
    """The server's checkpointer: the interface of shim.criu.checkpoint.Checkpointer, run by a worker."""

    def __init__(self, reaper: Reaper, background: BackgroundTasks, *, containerd_pid: int | None = None,
                 namespace: str = "") -> None:
        self.reaper = reaper
        self.background = background
        self.containerd_pid = containerd_pid
        self.namespace = namespace  # the worker's log lines carry it, as the server's do
        self._criu_version: list | None = None  # told by the first worker, given to the next ones

    async def checkpoint(self, *, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions,
                         runtime: OciRuntime, paused: bool | Callable[[], bool]) -> Checkpointed:
        from shim.criu.options import as_record

        is_paused = paused if callable(paused) else (lambda: paused)
        job: dict[str, Any] = {
            "protocol": PROTOCOL, "container_id": container_id, "bundle": bundle.path, "pid": pid,
            "options": as_record(options), "extra": dict(options.extra),
            "runtime": {"binary": runtime.config.binary, "root": runtime.config.root, "log": runtime.config.log,
                        "systemd_cgroup": bool(runtime.config.systemd_cgroup)},
            "paused": is_paused(), "env": dict(os.environ), "server_pid": os.getpid(), "umask": _umask(),
            "namespace": self.namespace,
            "debug": logging.getLogger().isEnabledFor(logging.DEBUG), "criu_version": self._criu_version,
            # Names the dump's own work dir and partial image: found again here if the worker dies (_leftovers).
            "token": os.urandom(6).hex(),
        }
        worker, sent = await self._connect(job)
        watching = asyncio.ensure_future(_forward_paused(worker, is_paused, job["paused"]))
        try:
            if not sent:
                worker.send({"job": job})
            message = await self._answer(worker, job, options, runtime, is_paused)
        except BaseException:
            watching.cancel()
            worker.close()
            raise
        if "ready" not in message:
            watching.cancel()
            worker.close()
            return self._result(message)
        # A lazy dump: its page server is up; the final answer comes when its pages have been served.
        completion = self.background.spawn(self._later(worker, watching, job, options, runtime, is_paused),
                                           f"lazy checkpoint of {container_id} (worker {worker.pid})")
        return Checkpointed(message["ready"], completion)

    async def _later(self, worker: Worker, watching: asyncio.Future, job: dict, options, runtime, is_paused):
        try:
            return self._result(await self._answer(worker, job, options, runtime, is_paused))
        finally:
            watching.cancel()
            worker.close()

    def _result(self, message: dict) -> Checkpointed:
        record = message["result"]
        if record.get("criu_version"):
            self._criu_version = record["criu_version"]
        return Checkpointed(record)

    async def _answer(self, worker: Worker, job: dict, options, runtime, is_paused) -> dict:
        """The worker's next "ready" or "result"; its "error" raised; its death handled and raised."""
        container_id = job["container_id"]
        try:
            message = await read_message(worker.reader)
        except ValueError as exc:
            message, broken = None, str(exc)
        else:
            broken = ""
        if message is None:
            await self._after_death(worker, job, options, runtime, is_paused)
            status = ""
            if worker.exited is not None and worker.exited.done():
                status = f", exit status {worker.exited.result().status}"
            raise WorkerGone(f"the {worker.describe()} ended without an answer{status}"
                             f"{': ' + broken if broken else ''}; CRIU was stopped with it and the task "
                             f"{'kept paused' if is_paused() else 'resumed'}. The shim's log and the kernel log may "
                             "say why it died; retry the checkpoint")
        if "error" in message:
            error = message["error"]
            kind = KINDS.get(error.get("kind"), errors.ShimError)
            raise kind(str(error.get("message") or "checkpoint failed in its worker"))
        if "ready" in message or "result" in message:
            return message
        raise errors.ShimError(f"checkpoint of {container_id}: unexpected answer from the {worker.describe()}")

    async def _after_death(self, worker: Worker, job: dict, options, runtime, is_paused) -> None:
        """A worker died mid-checkpoint: nothing of it may stay, and the task must be as it was."""
        container_id = job["container_id"]
        worker.kill_session()
        if worker.exited is not None:
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), 5)
            except TimeoutError:
                pass
        await self._leftovers(job, options)
        # CRIU freezes the task while it dumps and may have died with it frozen (or thawed a paused one).
        try:
            await (runtime.pause(container_id) if is_paused() else runtime.resume(container_id))
        except Exception as exc:  # noqa: BLE001 - "not paused" / "already paused" are the usual answers
            log.debug("after the checkpoint worker of %s died: %s", container_id, exc)
        log.error("checkpoint worker of %s (pid %d) died; its session was killed and the task left %s",
                  container_id, worker.pid, "paused" if is_paused() else "running")

    async def _leftovers(self, job: dict, options) -> None:
        """What a dead worker's dump left: CRIU's network lock (a CRIU killed after it locked the namespace leaves
        the task cut off behind it; its log says whether it locked, and which lock), its own work dir (the log
        kept in the bundle as criu-dump.log, as after a failed dump) and its partial image (process memory)."""
        import shutil

        from shim.bundle.config import Bundle
        from shim.criu import images, netlock

        bundle, token = job["bundle"], str(job.get("token") or "")
        if not token:
            return
        own_work = images.own_work_dir(bundle, token)
        work = options.work_path or own_work
        log_path = os.path.join(work, "dump.log")
        try:
            lock = netlock.after_dump(options, config=Bundle.read(bundle).config, pid=int(job["pid"]),
                                      log_text=netlock.read_text(log_path))
        except Exception as exc:  # noqa: BLE001 - the worker's death is what the caller must see
            log.warning("could not tell whether the dead checkpoint worker's dump left CRIU's network lock: %s", exc)
            lock = None
        if lock is not None:
            await netlock.release_logged(netlock.NamespaceFirewall(self.reaper), lock, "its checkpoint worker died")
        if os.path.exists(log_path):
            try:
                shutil.copyfile(log_path, os.path.join(bundle, "criu-dump.log"))
            except OSError:
                pass
        if not options.work_path:
            shutil.rmtree(own_work, ignore_errors=True)
        if options.image_path:
            shutil.rmtree(images.partial_path(options.image_path, token), ignore_errors=True)

    async def _connect(self, job: dict) -> tuple[Worker, bool]:
        """A worker that said hello, and whether it has the job already."""
        worker = await self._through_fork_server(job)
        if worker is not None:
            return worker, True
        return await self._exec_worker(), False

    async def _through_fork_server(self, job: dict) -> Worker | None:
        """The worker the fork server's checkpoint spare keeps waiting, or None when there is none to ask.

        The job goes with the connection, before the worker's hello is read: the worker, running the same code
        (the socket's key says so), reads it right after its hello instead of waiting for the server to wake up
        and send it (one hand-over less on the checkpoint's path). A worker whose hello does not come is closed
        on: it refuses a job whose connection is already closed (shim.criu.worker), so the worker started instead
        is the only one that dumps."""
        from shim.forkserver import criu_spare, wire

        if not self.containerd_pid or not wire.enabled():
            return None
        start = wire.process_start_time(self.containerd_pid)
        if start is None:
            return None
        # The key names this code and this containerd: a spare found there runs what this server runs.
        path = criu_spare.socket_path(wire.run_dir(),
                                      wire.server_key(wire.code_digest(), self.containerd_pid, start))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
            if not wire.trusted_uid(wire.peer_credentials(sock)[1]):
                raise OSError(f"{path} is served by another user")
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            writer.write(encode({"job": job}))
        except OSError as exc:
            sock.close()
            log.debug("no checkpoint worker from the fork server (%s): starting one", exc)
            return None
        try:
            pid = await _hello(reader)
        except (OSError, ValueError, TimeoutError) as exc:
            writer.close()
            log.info("the fork server's checkpoint spare gave no worker (%s): starting one", exc)
            return None
        return Worker(reader, writer, pid, "forked by the fork server's checkpoint spare", None)

    async def _exec_worker(self) -> Worker:
        """A fresh interpreter, our child, that imports the checkpoint path itself."""
        from shim.children.spawn import python_argv, spawn

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        subscription = self.reaper.subscribe()
        try:
            try:
                pid = spawn(python_argv(WORKER_STATEMENT),
                            pass_fds={WORKER_FD: theirs.fileno()}, stderr=None)
            finally:
                theirs.close()
        except OSError as exc:
            subscription.close()
            ours.close()
            raise errors.Unavailable(f"cannot start a checkpoint worker ({sys.executable}): {exc}") from None
        exited = asyncio.ensure_future(subscription.wait(pid))
        exited.add_done_callback(lambda _: subscription.close())
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            hello = await _hello(reader)
        except (OSError, ValueError, TimeoutError) as exc:
            writer.close()
            raise errors.Unavailable(f"the checkpoint worker (pid {pid}) did not start: {exc}") from None
        if hello != pid:
            log.warning("checkpoint worker said pid %d, started as %d", hello, pid)
        return Worker(reader, writer, pid, "started by the shim", exited)


async def _hello(reader) -> int:
    message = await asyncio.wait_for(read_message(reader), HELLO_TIMEOUT)
    if message is None:
        raise ValueError("closed before saying hello")
    if message.get("protocol") != PROTOCOL:
        raise ValueError(f"worker speaks protocol {message.get('protocol')}, the server {PROTOCOL}")
    return int(message["hello"])


async def _forward_paused(worker: Worker, is_paused, told: bool) -> None:
    """Tell the worker whenever the task is paused or resumed (containerd resumes a task during a lazy dump)."""
    while True:
        await asyncio.sleep(PAUSED_POLL)
        now = is_paused()
        if now != told:
            try:
                worker.send({"paused": now})
            except (OSError, RuntimeError):
                return
            told = now


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def session_members(sid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != sid and session_of(int(e)) == sid]
