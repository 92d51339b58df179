"""The process interface the task service calls without knowing which kind it holds (`Process`), and what the init
process and exec processes share in implementing it (`BaseProcess`): identity, stdio, exit, waiting."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shim.process.state import State, check

if TYPE_CHECKING:
    from shim.children.reaper import Exit
    from shim.stdio.process_io import ProcessIO


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process(Protocol):
    """A container's init or one of its exec processes, as the task service drives it: one signature per
    operation whatever the kind (the kind's own rules, such as a kill before a pending restore ran, live inside
    it). Every operation checks the state table first and fails with the error the caller gets."""

    id: str
    stdio: Stdio
    pid: int
    state: State
    exit_status: int
    exited_at: float | None

    async def start(self) -> int:
        """Start it (create, exec or restore through the OCI runtime); its pid."""

    async def kill(self, signal: int, all: bool = False) -> Exit | None:
        """Send the signal (to every process of the container too, with `all`, where that means something). The
        exit the kill itself caused when no process was there to exit (else None: the reaper reports it)."""

    async def delete(self) -> None:
        """Release what the process holds (its IO, its runtime state); its state becomes DELETED."""

    async def wait(self) -> None:
        """Return once it has exited."""

    async def resize(self, width: int, height: int) -> None:
        """Resize its terminal (nothing without one)."""

    def close_io(self) -> None:
        """Close its stdin: the writer is done (CloseIO)."""

    def set_exited(self, status: int, when: float | None = None) -> None:
        """Record its exit (once): status, time, state STOPPED, waiters woken."""

    def check(self, operation: str) -> None:
        """Raise the error `operation` gets in the current state (shim.process.state), if it is not allowed."""


class BaseProcess(ABC):
    """What both kinds share; each implements start, kill and delete."""

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
    async def start(self) -> int: ...

    @abstractmethod
    async def kill(self, signal: int, all: bool = False) -> Exit | None: ...

    @abstractmethod
    async def delete(self) -> None: ...

    async def wait(self) -> None:
        await self._exited.wait()

    async def resize(self, width: int, height: int) -> None:
        self.check("resize")
        if self.io is not None and self.stdio.terminal:
            self.io.resize(width, height)

    def close_io(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    async def release_io(self, drain_timeout: float = 2.0) -> None:
        """Let the output copies finish (bounded, as the Go shim does), then close the IO. A
        process that never ran (a restore that did not happen) has no output to wait for."""
        if self.io is not None:
            if self.pid:
                await self.io.wait_drained(drain_timeout)
            self.io.close()
