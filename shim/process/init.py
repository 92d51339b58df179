"""The container's init process: created by `runc create`, started by `runc start`, or
restored from a checkpoint when Create named one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.children.reaper import Exit
from shim.errors import FailedPrecondition, Interrupted, InvalidArgument, NotFound, ShimError, Unavailable
from shim.oci.runner import RuntimeFailed
from shim.oci.runtime import OciRuntime, is_gone
from shim.process.base import BaseProcess, Stdio
from shim.process.state import INIT_ALLOWED, State
from shim.rootfs import mounts

if TYPE_CHECKING:
    from shim.criu.options import CheckpointOptions
    from shim.process.criu_seam import Checkpointer, CheckpointOutcome, Restorer
    from shim.stdio.process_io import ProcessIO

log = logging.getLogger(__name__)

# How long a task thawed after its CRIU died mid-dump is watched for the exit that says it did not survive: a process
# CRIU was stepping through its injected code dies as soon as it runs (SIGTRAP or SIGSEGV), within milliseconds.
DEATH_AFTER_CRIU_S = 1.0
# How long the reaper is given to report the exit of an init that is already dead in the kernel.
EXIT_REPORTED_S = 2.0
# Errors of a checkpoint refused before the task was touched: nothing to tell about the task.
REFUSALS = (InvalidArgument, FailedPrecondition, Unavailable, NotFound)


class InitProcess(BaseProcess):
    ALLOWED = INIT_ALLOWED
    kind = "task"

    def __init__(self, id: str, bundle: Bundle, stdio: Stdio, *, runtime: OciRuntime, background: BackgroundTasks,
                 checkpointer: Checkpointer | None = None, restorer: Restorer | None = None, no_pivot: bool = False,
                 no_new_keyring: bool = False) -> None:
        super().__init__(id, stdio)
        self.bundle = bundle  # replaced by the one a restore returns (the only writer of config.json)
        self.runtime = runtime
        self.background = background
        self.checkpointer = checkpointer  # None: this shim was started without CRIU access
        self.restorer = restorer
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.checkpoint_image = ""  # the image a pending restore comes from
        self.checkpoint_work = ""
        self.lazy_dump: asyncio.Future[Any] | None = None  # a lazy dump serving its pages, until it ends
        self.network_lock: object | None = None  # CRIU's lock a checkpoint with exit left, removed by delete()
        self._restoring: asyncio.Task[Bundle] | None = None  # the restore Start runs, while it runs
        self._restore_stopped = False

    @property
    def rootfs(self) -> str:
        return self.bundle.rootfs

    @property
    def pid_file(self) -> str:
        return self.bundle.init_pid_file

    async def create(self, rootfs: list[mounts.Mount], io: ProcessIO, checkpoint: str = "",
                     checkpoint_work: str = "") -> None:
        """Mount the rootfs and create the container; with a checkpoint, only record it:
        Start restores it."""
        os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
        mounts.mount_all(rootfs, self.rootfs)
        self.io = io
        if checkpoint:
            self.checkpoint_image = checkpoint
            self.checkpoint_work = checkpoint_work
            self.state = State.RESTORE_PENDING
            return
        try:
            await self.runtime.create(self.id, bundle=self.bundle.path, pid_file=self.pid_file, stdio=io.runtime_stdio,
                                      console_socket=io.console_socket, no_pivot=self.no_pivot,
                                      no_new_keyring=self.no_new_keyring)
            if self.stdio.terminal:
                await io.receive_console(timeout=10)
            io.close_after_start()
            self.pid = self._read_pid()
        except BaseException:
            await self._undo_create()
            raise
        self.state = State.CREATED

    async def _undo_create(self) -> None:
        try:
            await self.runtime.delete(self.id, force=True)
        except RuntimeFailed:
            pass
        if self.io is not None:
            self.io.close()
        mounts.unmount_all(self.rootfs)

    def _read_pid(self) -> int:
        with open(self.pid_file) as f:
            return int(f.read().strip())

    async def start(self) -> int:
        self.check("start")
        if self.state is State.RESTORE_PENDING:
            await self._restore()
        else:
            await self.runtime.start(self.id)
        if self.state in (State.CREATED, State.RESTORE_PENDING):  # an exit seen meanwhile moved it on
            self.state = State.RUNNING
        return self.pid

    async def _restore(self) -> None:
        io = self.io
        assert io is not None, "create() sets the IO before it records a pending restore"
        if self.restorer is None:
            raise Unavailable(f"cannot restore {self.id}: this shim was started without restore support")
        self._restoring = asyncio.ensure_future(self.restorer.restore(
            container_id=self.id, bundle=self.bundle, image_path=self.checkpoint_image,
            work_path=self.checkpoint_work, runtime=self.runtime, stdio=io.runtime_stdio, pid_file=self.pid_file,
            console_socket=io.console_socket, no_pivot=self.no_pivot, end_container=self._end_after_lost_memory))
        try:
            self.bundle = await self._restoring
        except asyncio.CancelledError:
            if not self._restore_stopped:
                raise
            raise FailedPrecondition(f"restore of {self.id} stopped: the task was killed while it was being "
                                     "restored") from None
        finally:
            self._restoring = None
        if self.stdio.terminal:
            await io.receive_console(timeout=10)
        io.close_after_start()
        self.pid = self._read_pid()

    async def _end_after_lost_memory(self, reason: str) -> None:
        """A lazy restore's memory stopped coming (shim.criu.restore logged why): SIGKILL every process of the
        container; the init's exit (status 137) ends the task as any kill does."""
        await self.kill_all()

    async def _stop_restore(self) -> None:
        """End the restore Start is running, if one is (the task was killed before it was restored): runc and CRIU
        are killed and what they left removed before this returns."""
        if self._restoring is not None and not self._restoring.done():
            self._restore_stopped = True
            self._restoring.cancel()
            await asyncio.gather(self._restoring, return_exceptions=True)

    async def checkpoint(self, options: CheckpointOptions) -> CheckpointOutcome:
        """Dump this container (running or paused) through the injected Checkpointer (shim.criu.checkpoint)."""
        self.check("checkpoint")
        if self.checkpointer is None:
            raise Unavailable(f"cannot checkpoint {self.id}: this shim was started without checkpoint support")
        try:
            result = await self.checkpointer.checkpoint(container_id=self.id, bundle=self.bundle, pid=self.pid,
                                                        options=options, runtime=self.runtime,
                                                        paused=lambda: self.state is State.PAUSED)
        except ShimError as exc:
            if isinstance(exc, REFUSALS):
                raise
            raise await self._checkpoint_failed(exc) from exc
        self.network_lock = result.network_lock
        self.lazy_dump = result.completion
        return result

    async def _checkpoint_failed(self, error: ShimError) -> ShimError:
        """The failed dump's error with what became of the task, as seen, never assumed: a CRIU that failed undid
        its work and the task runs on, unless it died meanwhile (killed, out of memory); a CRIU that died before it
        finished may have taken a process with it."""
        interrupted = isinstance(error, Interrupted)
        if interrupted and self.state is State.PAUSED:
            # Frozen again, its processes cannot show yet whether they survived: the Resume that follows will.
            return _reworded(error, f"checkpoint of {self.id} failed; the task stays paused. If CRIU died while it "
                             "was stepping a process through its injected code, that process cannot go on: it dies "
                             f"when the task resumes, and its exit is reported as usual. {error}")
        grace = DEATH_AFTER_CRIU_S if interrupted else EXIT_REPORTED_S if not _alive(self.pid) else 0
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), grace)
        if not self.exited and _alive(self.pid):
            fate = "the task runs on" if interrupted else "the task was left as it was"
            return _reworded(error, f"checkpoint of {self.id} failed; {fate}. {error}")
        how = describe_exit(self.exit_status) if self.exited else "ended"
        cause = (" (CRIU died while stepping it through CRIU's injected code, and only CRIU held its registers)"
                 if interrupted and self.exited and self.exit_status in (128 + signal.SIGTRAP, 128 + signal.SIGSEGV)
                 else "")
        log.error("task %s did not survive its failed checkpoint: its init %s%s", self.id, how, cause)
        return _reworded(error, f"checkpoint of {self.id} failed, and the task did not survive it: its init {how} "
                         f"during the dump{cause}. {error}")

    def checkpoint_completed(self, result: CheckpointOutcome) -> None:
        """A lazy dump has served its pages: the network lock it left is the one Delete removes."""
        self.network_lock = result.network_lock

    async def kill(self, signal: int, all: bool = False) -> Exit | None:
        self.check("kill")
        if self.state is State.RESTORE_PENDING:
            # Nothing runs yet (the restore happens at Start, failed, or is running: it is stopped): the signal ends
            # the task as it would have ended its process, so a caller waiting for the exit gets one.
            await self._stop_restore()
            return Exit(0, 128 + signal, time.time())
        try:
            await self.runtime.kill(self.id, signal, all=all)
        except RuntimeFailed as exc:
            if is_gone(exc):
                raise NotFound(f"task {self.id}: process already finished") from None
            raise
        return None

    async def kill_all(self) -> None:
        """SIGKILL every process in the container (used when init exits without a pid namespace)."""
        try:
            await self.runtime.kill(self.id, 9, all=True)
        except RuntimeFailed as exc:
            if not is_gone(exc):
                raise

    async def pause(self) -> None:
        self.check("pause")
        await self.runtime.pause(self.id)
        self.state = State.PAUSED

    async def resume(self) -> None:
        self.check("resume")
        if self.lazy_dump is not None and not self.lazy_dump.done():
            # A lazy dump still serving its pages holds the task frozen (containerd resumes right
            # after Checkpoint returns): the task resumes when the dump is over.
            self.state = State.RUNNING
            self.background.spawn(self._resume_after_dump(self.lazy_dump), f"resume {self.id} after its lazy dump")
            return
        await self.runtime.resume(self.id)
        if self.state is State.PAUSED:
            self.state = State.RUNNING

    async def _resume_after_dump(self, dump: asyncio.Future[Any]) -> None:
        await asyncio.wait({dump})  # its outcome is the Checkpoint's to report, not ours
        try:
            await self.runtime.resume(self.id)
        except RuntimeFailed as exc:  # thawed already, or ended by a dump with exit
            log.debug("resuming %s after its lazy dump: %s", self.id, exc)

    async def pids(self) -> list[int]:
        self.check("pids")
        return await self.runtime.ps(self.id)

    async def update(self, resources: bytes) -> None:
        self.check("update")
        await self.runtime.update(self.id, resources, work_dir=self.bundle.path)

    async def delete(self) -> None:
        self.check("delete")
        try:
            await self.runtime.delete(self.id, force=self.state is State.RESTORE_PENDING)
        except RuntimeFailed as exc:
            if not is_gone(exc):
                raise
        await self.release_io()
        mounts.unmount_all(self.rootfs)
        if self.network_lock is not None and self.checkpointer is not None:
            # The task is gone and its checkpoint left CRIU's network lock in a namespace that outlives it: no
            # restore is known to come there (see shim.criu.netlock), and the lock cuts the namespace off.
            await self.checkpointer.release_network_lock(self.network_lock, f"task {self.id} deleted")
            self.network_lock = None
        self.state = State.DELETED

    def shares_host_pid_namespace(self) -> bool:
        """True when the container has no pid namespace of its own: its processes outlive init."""
        return not self.bundle.has_own_namespace("pid")


def _reworded(error: ShimError, message: str) -> ShimError:
    """error's kind (the shim.errors class the task service maps to a status code) with message."""
    kind = next(cls for cls in type(error).__mro__ if cls.__module__ == ShimError.__module__)
    return kind(message)


def _alive(pid: int) -> bool:
    """Whether the process runs (or is frozen, or stopped) rather than being a zombie or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def describe_exit(status: int) -> str:
    """An exit status as containerd reports it (128 + N for a process killed by signal N), in words."""
    if 128 < status < 128 + 65:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(status - 128).name} (exit status {status})"
    return f"exited with status {status}"
