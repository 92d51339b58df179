"""Scaffolding for the CRIU tests: a loop with a reaper, processes to dump, /proc state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal

import pytest

from shim.children.reaper import Reaper
from shim.children.spawn import spawn

needs_criu = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("criu") is None,
                                reason="needs root and criu on PATH")


def run(coro, timeout: float = 15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def reaping():
    """A reaper serving SIGCHLD for the duration, recording every exit it sees. No subreaper:
    the tests' processes and a restored tree (rst_sibling) are direct children."""
    reaper = Reaper()
    reaper.exits = []
    reaper.add_listener(reaper.exits.append)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
    try:
        yield reaper
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)


@contextlib.asynccontextmanager
async def target(reaper: Reaper, *argv: str):
    """A process in its own session (CRIU refuses to dump a tree sharing our session unless
    shell_job), killed and reaped at the end if it is still there."""
    with reaper.subscribe() as exits:
        pid = spawn(argv or ("sleep", "1000"), setsid=True)
        try:
            await wait_for_exec(pid, argv[-1] if argv else "1000")
            yield pid, exits
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # reaped already (dumped without leave_running): its exit was delivered
            else:
                await exits.wait(pid)


async def wait_for_exec(pid: int, last_arg: str) -> None:
    """Dumping a process halfway through exec (unshare -> sleep) would dump the wrong image."""
    for _ in range(200):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if args[0].endswith(b"sleep") and last_arg.encode() in args:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pid {pid} never became sleep")


def state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: R, S, T (stopped), t (ptrace stop), Z..."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def images_dir(tmp_path, name: str = "images") -> int:
    """An images directory and an fd of ours for it (criu_opts.images_dir_fd)."""
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
