"""Starting child processes without taking waitpid away from the reaper.

subprocess.Popen must not be used in the shim: a collected Popen object may reap its pid
behind the reaper's back and the exit status would be lost. posix_spawn starts the child;
the caller's reaper Subscription (taken before spawning) delivers its exit.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.children.proctree import descendants
from shim.children.reaper import Exit, Reaper

if TYPE_CHECKING:
    from collections.abc import Awaitable

# Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, and runc would hand them on
# to the container's processes. Children start with every signal at its default, as under Go.
DEFAULT_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP) and s < 65)


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes


def python_argv(statement: str, *args: str) -> list[str]:
    """Our interpreter afresh (-IS: no site packages, no PYTHON* environment) that sees the shim's package where
    this process does, running statement (sys imported; args after the path, from sys.argv[2] on)."""
    import json
    import sys

    return [sys.executable, "-IS", "-c", "import sys, json; sys.path[:] = json.loads(sys.argv[1]); " + statement,
            json.dumps(sys.path), *args]


def spawn(argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
          pass_fds: Mapping[int, int] | None = None, env: Mapping[str, str] | None = None,
          setsid: bool = False, cwd: str | None = None) -> int:
    """Start argv[0] (looked up on PATH). pass_fds maps child fd -> our fd. Returns the pid."""
    null = os.open(os.devnull, os.O_RDWR)
    # dup2 actions run in order, so a source that is also some other action's target would
    # be overwritten before use: every source is first copied above all targets.
    wanted = {0: null if stdin is None else stdin, 1: null if stdout is None else stdout,
              2: null if stderr is None else stderr, **(pass_fds or {})}
    floor = max(wanted) + 1
    sources = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for target, fd in wanted.items()}
    try:
        actions = [(os.POSIX_SPAWN_DUP2, source, target) for target, source in sources.items()]
        if cwd is not None:
            # posix_spawn has no chdir action before Python 3.13's POSIX_SPAWN_CHDIR: go through sh.
            argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        return os.posix_spawnp(argv[0], list(argv), dict(os.environ if env is None else env),
                               file_actions=actions, setsid=setsid, setsigdef=DEFAULT_SIGNALS, setsigmask=())
    finally:
        os.close(null)
        for source in sources.values():
            os.close(source)


async def run(reaper: Reaper, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
              stdio: tuple[int | None, int | None, int | None] | None = None, pass_fds: Mapping[int, int] | None = None,
              env: Mapping[str, str] | None = None, cwd: str | None = None,
              started: Callable[[int], object] | None = None) -> Completed:
    """Run a command to completion. Output is captured in memory files unless stdio is given
    (then the command writes where the caller says, e.g. a container's pipes); started(pid) right after the
    spawn (it must not raise)."""
    captured = [os.memfd_create("stdout"), os.memfd_create("stderr")]
    stdin_fd = None
    try:
        if input is not None:
            stdin_fd = os.memfd_create("stdin")
            os.write(stdin_fd, input)
            os.lseek(stdin_fd, 0, os.SEEK_SET)
        fds = stdio or (stdin_fd, captured[0], captured[1])
        with reaper.subscribe() as exits:
            pid = spawn(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], pass_fds=pass_fds, env=env, cwd=cwd)
            if started is not None:
                started(pid)
            exit = await wait_or_kill(exits.wait(pid), pid, timeout)
        return Completed(tuple(argv), exit.status, _read_all(captured[0]), _read_all(captured[1]))
    finally:
        for fd in captured + ([stdin_fd] if stdin_fd is not None else []):
            os.close(fd)


async def wait_or_kill(waiting: Awaitable[Exit], pid: int, timeout: float | None) -> Exit:
    """Await an exit; past the timeout, SIGKILL the process (ours, by pid) and report TimeoutError. Cancelled
    (the call that ran it was cancelled: its caller went away, or the task was killed mid-restore), the process
    is killed too, and reaped, rather than left running for nobody."""
    task = asyncio.ensure_future(waiting)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await asyncio.shield(_kill_tree_and_wait(pid, task))
        raise
    if task in done:
        return task.result()
    await _kill_tree_and_wait(pid, task)
    raise TimeoutError(f"pid {pid} did not finish within {timeout}s and was killed with what it started")


KILLED_GONE = 10.0  # seconds for killed processes to be gone (a big one takes a while to release its memory)


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything it started (a hung `runc restore` leaves
    CRIU and the half-restored tree behind otherwise). Pidfds are taken first, so a pid reused
    meanwhile is never signalled."""
    for pidfd in _signal_tree(pid):
        os.close(pidfd)


def _signal_tree(pid: int) -> list[int]:
    pidfds = []
    for target in [pid, *descendants(pid)]:
        try:
            pidfds.append(os.pidfd_open(target))
        except OSError:
            pass
    for pidfd in pidfds:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pidfds


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def _kill_tree_and_wait(pid: int, exited: asyncio.Future) -> None:
    """kill_tree, then wait until every killed process is gone (a pidfd turns readable when its process exits),
    not only the one we reap: what runs after (removing a restore's cgroups) needs them out of their cgroups."""
    pidfds = _signal_tree(pid)
    loop = asyncio.get_running_loop()
    try:
        gone = []
        for pidfd in pidfds:
            future = loop.create_future()
            loop.add_reader(pidfd, _set_once, future)
            gone.append(future)
        await asyncio.wait([*gone, exited], timeout=KILLED_GONE, return_when=asyncio.ALL_COMPLETED)
    finally:
        for pidfd in pidfds:
            loop.remove_reader(pidfd)
            os.close(pidfd)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
