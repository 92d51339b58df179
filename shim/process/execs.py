"""An additional process started inside a running container (`ctr task exec`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from shim.errors import NotFound
from shim.oci.runtime import OciRuntime
from shim.process.base import Process, Stdio
from shim.process.state import EXEC_ALLOWED, State

if TYPE_CHECKING:
    from shim.stdio.process_io import ProcessIO


class ExecProcess(Process):
    ALLOWED = EXEC_ALLOWED
    kind = "exec"

    def __init__(self, container_id: str, exec_id: str, spec: dict, stdio: Stdio, *, runtime: OciRuntime,
                 bundle: str) -> None:
        super().__init__(exec_id, stdio)
        self.container_id = container_id
        self.spec = spec
        self.runtime = runtime
        self.bundle = bundle

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, f"{self.id}.pid")

    async def start(self, io: ProcessIO) -> int:
        self.check("start")
        self.io = io
        await self.runtime.exec(self.container_id, self.spec, pid_file=self.pid_file, stdio=io.runtime_stdio,
                                console_socket=io.console_socket, work_dir=self.bundle)
        if self.stdio.terminal:
            await io.receive_console(timeout=10)
        io.close_after_start()
        with open(self.pid_file) as f:
            self.pid = int(f.read().strip())
        self.state = State.RUNNING
        return self.pid

    async def kill(self, signal: int, all: bool = False) -> None:
        """`all` changes nothing: an exec is one process (the Go shim ignores it for execs too)."""
        self.check("kill")
        if not self.pid:
            raise NotFound(f"exec {self.id} has not started")
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError:
            raise NotFound(f"exec {self.id}: process already finished") from None

    async def delete(self) -> None:
        self.check("delete")
        await self.release_io()
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        self.state = State.DELETED
