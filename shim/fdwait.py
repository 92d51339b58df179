"""Waiting on the running event loop until a descriptor is readable: the one way pyshim's coroutines wait for a
non-blocking fd (a pipe, a socket, an eventfd) that is not a stream of their own."""

from __future__ import annotations

import asyncio


async def readable(fd: int) -> None:
    """Return once fd is readable (or at EOF, or in error: the read that follows says which). The loop stops
    watching fd however the wait ends, cancellation included, so the caller may close it straight after."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
