"""binary:// logging processes.

The shim starts the logger with the URI's query parameters as arguments, an environment of
CONTAINER_ID, CONTAINER_NAMESPACE and any env.NAME parameters (nothing else, as upstream), the
container's stdout pipe on fd 3, its stderr pipe on fd 4, and the write end of a "ready" pipe
on fd 5. The logger is ready when it writes to fd 5 or closes it; the shim waits for that,
bounded, before the container may start.

Exits: a reaper subscription is taken before spawning and held while waiting for readiness,
so an early death is reported with its status. For the rest of its life the logger is tracked
through a pidfd: signals cannot hit a recycled pid, and a subscription held for the
container's whole life would buffer every exit the shim sees. When the IO is closed the logger
gets SIGTERM, a bounded wait under a fresh subscription, then SIGKILL, as upstream.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import select
import signal

from shim.background import BackgroundTasks
from shim.children.reaper import Reaper
from shim.children.spawn import spawn
from shim.fdwait import readable
from shim.stdio.errors import StdioError
from shim.stdio.fds import Fd, plain_pipe
from shim.stdio.uri import Target

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
TERM_TIMEOUT = 12.0  # upstream gives the logger 12 s to flush after SIGTERM
_HIGH_FD = 10  # above the fds (3, 4, 5) the logger receives, see _spawn


class Logger:
    def __init__(self, target: Target, reaper: Reaper, background: BackgroundTasks, pid: int, pidfd: Fd) -> None:
        self.path = target.path
        self.pid = pid
        self._reaper = reaper
        self._background = background
        self._pidfd = pidfd

    @classmethod
    async def start(cls, target: Target, *, reaper: Reaper, background: BackgroundTasks, stdout: Fd, stderr: Fd,
                    container_id: str, namespace: str, timeout: float = READY_TIMEOUT) -> Logger:
        """Start the logger on the read ends `stdout` and `stderr` and wait until it is ready."""
        env = {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace, **dict(target.env)}
        ready_r, ready_w = plain_pipe("logger ready pipe")
        try:
            with reaper.subscribe() as exits:
                try:
                    pid = _spawn([target.path, *target.args], {3: stdout.fd, 4: stderr.fd, 5: ready_w.fd}, env)
                except OSError as exc:
                    raise StdioError(f"cannot start logger {target.path}: {exc.strerror}") from exc
                # Opened before the loop runs again, hence before the reaper can have reaped it.
                logger = cls(target, reaper, background, pid, Fd(os.pidfd_open(pid), f"logger {pid} pidfd"))
                ready_w.close()  # else our copy would hide the logger's close of fd 5
                try:
                    await logger._await_ready(ready_r, target, timeout, exits)
                except BaseException:
                    if logger._alive():
                        logger._signal(signal.SIGKILL)
                        await _collect(exits, pid, 1.0)  # reaped by now; consume it here
                    logger._pidfd.close()
                    raise
            return logger
        finally:
            ready_r.close()
            ready_w.close()

    async def _await_ready(self, ready: Fd, target: Target, timeout: float, exits) -> None:
        try:
            await asyncio.wait_for(readable(ready.fd), timeout)
        except TimeoutError:
            raise StdioError(f"logger {self.path} did not signal readiness within {timeout:g}s") from None
        if os.read(ready.fd, 1) or not target.strict_ready:
            return  # binary://: closing fd 5 counts as ready, even by exiting (as upstream)
        exit = await _collect(exits, self.pid, 1.0)
        how = f"exited with status {exit.status}" if exit else "closed fd 5"
        raise StdioError(f"logger {self.path} {how} without signalling readiness")

    def terminate(self) -> None:
        """SIGTERM now; SIGKILL if it has not exited after TERM_TIMEOUT. Does not block."""
        if self._pidfd.closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop to wait on: do not leave it running
            self._signal(signal.SIGKILL)
            self._pidfd.close()
            return
        if not self._alive():
            self._pidfd.close()
            return
        # Subscribed while it is alive, so its exit cannot have been reaped yet.
        exits = self._reaper.subscribe()
        self._signal(signal.SIGTERM)
        self._background.spawn(self._reap(exits), f"logger {self.path} (pid {self.pid}) after SIGTERM")

    async def _reap(self, exits) -> None:
        try:
            exit = await _collect(exits, self.pid, TERM_TIMEOUT)
            if exit is None:
                log.warning("logger %s (pid %d) ignored SIGTERM for %gs, killing it", self.path, self.pid, TERM_TIMEOUT)
                self._signal(signal.SIGKILL)
                exit = await _collect(exits, self.pid, TERM_TIMEOUT)
            if exit is not None and exit.status not in (0, 128 + signal.SIGTERM):
                log.warning("logger %s (pid %d) exited with status %d", self.path, self.pid, exit.status)
        finally:
            exits.close()
            self._pidfd.close()

    def _alive(self) -> bool:
        # A pidfd becomes readable when its process exits.
        return not select.select([self._pidfd.fd], [], [], 0)[0]

    def _signal(self, signum: int) -> None:
        if self._pidfd.closed:
            return
        try:
            signal.pidfd_send_signal(self._pidfd.fd, signum)
        except ProcessLookupError:
            pass


async def _collect(exits, pid: int, timeout: float):
    try:
        return await asyncio.wait_for(exits.wait(pid), timeout)
    except TimeoutError:
        return None


def _spawn(argv: list[str], fds: dict[int, int], env: dict[str, str]) -> int:
    """spawn() applies its dup2s in order, so a source fd that is also a target (3, 4 or 5) could
    be overwritten before it is used. Move the sources above the targets first."""
    high = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for target, fd in fds.items()}
    try:
        return spawn(argv, pass_fds=high, env=env)
    finally:
        for fd in high.values():
            os.close(fd)
