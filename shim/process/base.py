"""What the init process and exec processes share: identity, stdio, exit, waiting, and the operations the task
service calls on either without knowing which it holds (kill, delete)."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.process.state import State, check

if TYPE_CHECKING:
    from shim.stdio.process_io import ProcessIO


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process(ABC):
    ALLOWED: dict[str, set[State]] = {}
    kind = "process"

    def __init__(self, id: str, stdio: Stdio) -> None:
        self.id = id
        self.stdio = stdio
        self.pid = 0
        self.state = State.CREATED
        self.exit_status = 0
        self.exited_at: float | None = None
        self.io: ProcessIO | None = None  # once created
        self._exited = asyncio.Event()

    def check(self, operation: str) -> None:
        check(self.ALLOWED, operation, self.state, f"{self.kind} {self.id}")

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def set_exited(self, status: int, when: float | None = None) -> None:
        if self._exited.is_set():
            return
        self.exit_status = status
        self.exited_at = when or time.time()
        if self.state is not State.DELETED:
            self.state = State.STOPPED
        if self.io is not None and self.stdio.terminal:
            self.io.process_exited()
        self._exited.set()

    @abstractmethod
    async def kill(self, signal: int, all: bool = False) -> None:
        """Send the signal (to every process of the container too, with `all`, where that means something)."""

    @abstractmethod
    async def delete(self) -> None:
        """Release what the process holds (its IO, its runtime state); its state becomes DELETED."""

    async def wait(self) -> None:
        await self._exited.wait()

    async def resize(self, width: int, height: int) -> None:
        self.check("resize")
        if self.io is not None and self.stdio.terminal:
            self.io.resize(width, height)

    def close_stdin(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    async def release_io(self, drain_timeout: float = 2.0) -> None:
        """Let the output copies finish (bounded, as the Go shim does), then close the IO. A
        process that never ran (a restore that did not happen) has no output to wait for."""
        if self.io is not None:
            if self.pid:
                await self.io.wait_drained(drain_timeout)
            self.io.close()
