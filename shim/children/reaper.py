"""The one owner of waitpid in the shim.

The shim is a child subreaper: runc's container processes are re-parented to it when runc
exits, and every exit in its process tree arrives here as a SIGCHLD. Nothing else may call
waitpid, so nothing else may use asyncio's subprocess support or subprocess.Popen.wait.

Whoever starts a process subscribes first and spawns second: an exit that happens before
spawn() returns is already in the subscription's buffer and cannot be lost.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number as containerd reports it
    timestamp: float


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def set_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Subscription:
    """Every exit the reaper sees from its creation until it is closed."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._exits: dict[int, Exit] = {}
        self._waiters: dict[int, asyncio.Future] = {}

    def _deliver(self, exit: Exit) -> None:
        waiter = self._waiters.pop(exit.pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(exit)
        else:
            self._exits[exit.pid] = exit

    async def wait(self, pid: int) -> Exit:
        if pid in self._exits:
            return self._exits.pop(pid)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[pid] = waiter
        try:
            return await waiter
        finally:
            self._waiters.pop(pid, None)

    def close(self) -> None:
        self._reaper._subscriptions.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reaper:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._listeners: list[Callable[[Exit], None]] = []

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become a subreaper and reap on every SIGCHLD (and once now, for anything missed)."""
        set_child_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscriptions.add(subscription)
        return subscription

    def add_listener(self, listener: Callable[[Exit], None]) -> None:
        """Called with every exit, for the lifetime of the shim (the task service's exit handling)."""
        self._listeners.append(listener)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.dispatch(Exit(pid, exit_status(status), time.time()))

    def dispatch(self, exit: Exit) -> None:
        for subscription in list(self._subscriptions):
            subscription._deliver(exit)
        for listener in self._listeners:
            try:
                listener(exit)
            except Exception:
                log.exception("exit listener failed for pid %d", exit.pid)
