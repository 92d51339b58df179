"""Shared scaffolding: an event loop with a reaper, fifos, and reading them from the client side."""

import asyncio
import contextlib
import os
import signal

from shim.children.reaper import Reaper
from shim.children.spawn import spawn


def run(coro, timeout: float = 10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def reaping():
    """A reaper serving SIGCHLD for the duration (no subreaper needed for direct children)."""
    reaper = Reaper()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
    try:
        yield reaper
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)


def fifos(tmp_path, *names):
    paths = []
    for name in names:
        path = str(tmp_path / name)
        os.mkfifo(path)
        paths.append(path)
    return paths


async def read_to_eof(path: str, chunks: list[bytes] | None = None) -> bytes:
    """Read a fifo as the client does, in a thread, until every writer is gone. Opened without
    blocking: if the shim's writer is already gone, that is end of file rather than a hang.
    `chunks`, when given, receives what is read as it comes (for a test that waits on it)."""
    chunks = [] if chunks is None else chunks

    def read() -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.set_blocking(fd, True)
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    return await asyncio.to_thread(read)


async def write_and_close(path: str, data: bytes) -> None:
    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(data)
    await asyncio.to_thread(write)


async def run_child(reaper: Reaper, argv, stdio, timeout: float = 5) -> int:
    """Play the container: start argv on the runtime's fds, return its exit status."""
    with reaper.subscribe() as exits:
        pid = spawn(argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        return (await asyncio.wait_for(exits.wait(pid), timeout)).status


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def until(predicate, timeout: float = 3, interval: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
