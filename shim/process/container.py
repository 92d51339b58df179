"""A container as the shim holds it: its init process, its exec processes, its runtime."""

from __future__ import annotations

import asyncio

from shim.bundle.config import Bundle
from shim.errors import AlreadyExists, FailedPrecondition, NotFound
from shim.oci.runtime import OciRuntime
from shim.process.base import Process
from shim.process.execs import ExecProcess
from shim.process.init import InitProcess


class Container:
    def __init__(self, id: str, namespace: str, init: InitProcess, runtime: OciRuntime, *,
                 io_owner: tuple[int, int] = (0, 0)) -> None:
        self.id = id
        self.io_owner = io_owner  # (uid, gid) owning the pipes of every process, execs included
        self.namespace = namespace
        self.init = init
        self.runtime = runtime
        self.execs: dict[str, ExecProcess] = {}
        # Exec processes started and not yet exited: the init's exit is published after theirs.
        self.running_execs = 0
        self.execs_changed = asyncio.Condition()
        self.init_exited = False

    @property
    def bundle(self) -> Bundle:
        """The bundle as the init holds it (a restore replaces it)."""
        return self.init.bundle

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id!r} does not exist in task {self.id}") from None

    def add_exec(self, process: ExecProcess) -> None:
        if process.id in self.execs:
            raise AlreadyExists(f"exec {process.id!r} already exists in task {self.id}")
        self.init.check("exec")
        self.execs[process.id] = process

    def note_exit(self, process: Process) -> bool:
        """Record that `process` exited; True when it is the init, whose exit ends the container (no exec starts
        after it, and its exit is published after its execs')."""
        if process is self.init:
            self.init_exited = True
            return True
        return False

    def exec_may_start(self) -> None:
        if self.init_exited:
            raise FailedPrecondition(f"task {self.id}: init process is not running")

    async def exec_count_changed(self, delta: int) -> None:
        async with self.execs_changed:
            self.running_execs += delta
            self.execs_changed.notify_all()

    async def wait_for_execs(self) -> None:
        async with self.execs_changed:
            await self.execs_changed.wait_for(lambda: self.running_execs <= 0)
