"""The container's init process: created by `runc create`, started by `runc start`, or
restored from a checkpoint when Create named one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING

from shim.bundle.layout import INIT_PID_FILE
from shim.errors import FailedPrecondition, NotFound
from shim.oci.runner import RuntimeFailed
from shim.oci.runtime import OciRuntime, is_gone
from shim.process.base import Process, Stdio
from shim.process.state import INIT_ALLOWED, State
from shim.rootfs import mounts

if TYPE_CHECKING:
    from shim.criu.netlock import Lock
    from shim.criu.options import CheckpointOptions
    from shim.process.checkpointer import Checkpointer, CheckpointOutcome
    from shim.stdio.process_io import ProcessIO

log = logging.getLogger(__name__)


class InitProcess(Process):
    ALLOWED = INIT_ALLOWED
    kind = "task"

    def __init__(self, id: str, bundle: str, stdio: Stdio, *, runtime: OciRuntime, no_pivot: bool = False,
                 no_new_keyring: bool = False) -> None:
        super().__init__(id, stdio)
        self.bundle = bundle
        self.runtime = runtime
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.checkpoint = ""  # the image a pending restore comes from
        self.checkpoint_work = ""
        self.lazy_dump: asyncio.Future | None = None  # a lazy dump serving its pages, until it ends
        self.network_lock: Lock | None = None  # CRIU's lock a checkpoint with exit left, removed by delete()
        self._restoring: asyncio.Task | None = None  # the restore Start runs, while it runs
        self._restore_stopped = False

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, INIT_PID_FILE)

    async def create(self, rootfs: list[mounts.Mount], io: ProcessIO, checkpoint: str = "",
                     checkpoint_work: str = "") -> None:
        """Mount the rootfs and create the container; with a checkpoint, only record it:
        Start restores it."""
        os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
        mounts.mount_all(rootfs, self.rootfs)
        self.io = io
        if checkpoint:
            self.checkpoint = checkpoint
            self.checkpoint_work = checkpoint_work
            self.state = State.RESTORE_PENDING
            return
        try:
            await self.runtime.create(self.id, bundle=self.bundle, pid_file=self.pid_file, stdio=io.runtime_stdio,
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
        from shim.criu.restore import restore

        io = self.io
        assert io is not None, "create() sets the IO before it records a pending restore"
        self._restoring = asyncio.ensure_future(restore(
            container_id=self.id, bundle=self.bundle, image_path=self.checkpoint, work_path=self.checkpoint_work,
            runtime=self.runtime, stdio=io.runtime_stdio, pid_file=self.pid_file,
            console_socket=io.console_socket, no_pivot=self.no_pivot))
        try:
            await self._restoring
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

    async def stop_restore(self) -> None:
        """End the restore Start is running, if one is (the task was killed before it was restored): runc and CRIU
        are killed and what they left removed before this returns."""
        if self._restoring is not None and not self._restoring.done():
            self._restore_stopped = True
            self._restoring.cancel()
            await asyncio.gather(self._restoring, return_exceptions=True)

    async def checkpoint_to(self, checkpointer: Checkpointer, options: CheckpointOptions) -> CheckpointOutcome:
        """Dump this container (running or paused); see shim.criu.checkpoint."""
        self.check("checkpoint")
        result = await checkpointer.checkpoint(container_id=self.id, bundle=self.bundle, pid=self.pid,
                                               options=options, runtime=self.runtime,
                                               paused=lambda: self.state is State.PAUSED)
        self.network_lock = result.network_lock
        self.lazy_dump = result.completion
        return result

    async def kill(self, signal: int, all: bool = False) -> None:
        self.check("kill")
        try:
            await self.runtime.kill(self.id, signal, all=all)
        except RuntimeFailed as exc:
            if is_gone(exc):
                raise NotFound(f"task {self.id}: process already finished") from None
            raise

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
            self.lazy_dump.add_done_callback(lambda _: asyncio.ensure_future(self._resume_after_dump()))
            return
        await self.runtime.resume(self.id)
        if self.state is State.PAUSED:
            self.state = State.RUNNING

    async def _resume_after_dump(self) -> None:
        try:
            await self.runtime.resume(self.id)
        except RuntimeFailed as exc:  # thawed already, or ended by a dump with exit
            log.debug("resuming %s after its lazy dump: %s", self.id, exc)

    async def pids(self) -> list[int]:
        self.check("pids")
        return await self.runtime.ps(self.id)

    async def update(self, resources: bytes) -> None:
        self.check("update")
        await self.runtime.update(self.id, resources, work_dir=self.bundle)

    async def delete(self) -> None:
        self.check("delete")
        try:
            await self.runtime.delete(self.id, force=self.state is State.RESTORE_PENDING)
        except RuntimeFailed as exc:
            if not is_gone(exc):
                raise
        await self.release_io()
        mounts.unmount_all(self.rootfs)
        if self.network_lock is not None:
            # The task is gone and its checkpoint left CRIU's network lock in a namespace that outlives it: no
            # restore is known to come there (see shim.criu.netlock), and the lock cuts the namespace off.
            from shim.criu.netlock import release_logged

            await release_logged(self.runtime.run.reaper, self.network_lock, f"task {self.id} deleted")
            self.network_lock = None
        self.state = State.DELETED

    def shares_host_pid_namespace(self) -> bool:
        """True when the container has no pid namespace of its own: its processes outlive init."""
        try:
            with open(os.path.join(self.bundle, "config.json"), "rb") as f:
                namespaces = (json.load(f).get("linux") or {}).get("namespaces") or []
        except (OSError, ValueError):
            return False
        return not any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
