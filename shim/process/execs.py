"""An additional process started inside a running container (`ctr task exec`)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shim.bundle.config import Bundle
from shim.errors import NotFound
from shim.oci.runtime import OciRuntime
from shim.process.base import BaseProcess, Stdio
from shim.process.state import EXEC_ALLOWED, State

if TYPE_CHECKING:
    from shim.children.reaper import Exit
    from shim.stdio.process_io import ProcessIO

# Creates the stdio of a process (its configuration): the task service's IO factory, bound to the container.
OpenIO = Callable[[Stdio], Awaitable["ProcessIO"]]


class ExecProcess(BaseProcess):
    ALLOWED = EXEC_ALLOWED
    kind = "exec"

    def __init__(self, container_id: str, exec_id: str, spec: dict[str, Any], stdio: Stdio, *, runtime: OciRuntime,
                 bundle: Bundle, open_io: OpenIO) -> None:
        super().__init__(exec_id, stdio)
        self.container_id = container_id
        self.spec = spec
        self.runtime = runtime
        self.bundle = bundle
        self._open_io = open_io

    @property
    def pid_file(self) -> str:
        return self.bundle.exec_pid_file(self.id)

    async def start(self) -> int:
        self.check("start")
        self.io = io = await self._open_io(self.stdio)
        await self.runtime.exec(self.container_id, self.spec, pid_file=self.pid_file, stdio=io.runtime_stdio,
                                console_socket=io.console_socket, work_dir=self.bundle.path)
        if self.stdio.terminal:
            await io.receive_console(timeout=10)
        io.close_after_start()
        with open(self.pid_file) as f:
            self.pid = int(f.read().strip())
        self.state = State.RUNNING
        return self.pid

    async def kill(self, signal: int, all: bool = False) -> Exit | None:
        """`all` changes nothing: an exec is one process (the Go shim ignores it for execs too)."""
        self.check("kill")
        if not self.pid:
            raise NotFound(f"exec {self.id} has not started")
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError:
            raise NotFound(f"exec {self.id}: process already finished") from None
        return None

    async def delete(self) -> None:
        self.check("delete")
        await self.release_io()
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        self.state = State.DELETED
