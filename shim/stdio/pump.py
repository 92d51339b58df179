"""Copying bytes from one non-blocking fd to another on the event loop, with backpressure.

A Pump holds at most one chunk. While that chunk cannot be written it stops watching the
source, so a slow destination slows the producer down (its pipe fills up and its writes block)
instead of the shim buffering without bound.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # one default pipe's capacity: one read per wake-up empties a full pipe


class Pump:
    def __init__(self, name: str, src: int, dst: int, *, chunk: int = CHUNK,
                 on_done: Callable[[], None] | None = None) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._src = src
        self._dst = dst
        self._chunk = chunk
        self._on_done = on_done
        self._pending = memoryview(b"")
        self._reading = False
        self._writing = False
        self._finishing = False  # finish() was called: stop at the first read that would block
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.copied = 0  # bytes written to the destination
        self.stalls = 0  # times the destination was full and reading paused
        self.eof = False  # the source reached end of file (rather than the copy being stopped)
        self.error: OSError | None = None  # what ended the copy, when it was not end of file

    def start(self) -> None:
        if not self.done.done() and not self._reading:
            self._loop.add_reader(self._src, self._read)
            self._reading = True

    def finish(self) -> None:
        """Copy what the source holds now, then stop at the first read that would block, instead of waiting
        for end of file. What is pending is still written (backpressure applies as before)."""
        if self.done.done() or self._finishing:
            return
        self._finishing = True
        if not self._writing:
            # The source may have nothing to read and never become readable: try once now.
            self._loop.call_soon(self._read)

    def stop(self) -> None:
        """End the copy now (whatever is pending is dropped) and run on_done, once."""
        if self.done.done():
            return
        # Unregister before anyone closes the fds: a stale registration would hit whatever
        # reuses the number.
        if self._reading:
            self._loop.remove_reader(self._src)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._dst)
            self._writing = False
        self._pending = memoryview(b"")
        self.done.set_result(None)
        if self._on_done is not None:
            try:
                self._on_done()
            except Exception:
                log.exception("%s: cleanup after the copy failed", self.name)

    def _read(self) -> None:
        if self.done.done() or self._writing:  # a read scheduled by finish() after the copy ended or stalled
            return
        try:
            data = os.read(self._src, self._chunk)
        except BlockingIOError:
            if self._finishing:
                self.stop()
            return
        except OSError as exc:
            # EIO is how a pty master reports that the last slave fd was closed: end of file.
            if exc.errno != errno.EIO:
                self.error = exc
                log.warning("%s: reading failed: %s", self.name, exc)
            data = b""
        if not data:
            self.eof = self.error is None
            self.stop()
            return
        self._pending = memoryview(data)
        self._write()

    def _write(self) -> None:
        while self._pending:
            try:
                written = os.write(self._dst, self._pending)
            except BlockingIOError:
                if not self._writing:
                    self._loop.remove_reader(self._src)
                    self._reading = False
                    self._loop.add_writer(self._dst, self._write)
                    self._writing = True
                    self.stalls += 1
                return
            except OSError as exc:
                # EPIPE (the process closed its stdin) or EIO (a pty without slave): nobody will
                # ever read what follows, so reading more would only lose it.
                self.error = exc
                log.debug("%s: destination gone: %s", self.name, exc)
                self.stop()
                return
            self.copied += written
            self._pending = self._pending[written:]
        if self._writing:
            self._loop.remove_writer(self._dst)
            self._writing = False
        self.start()
        if self._finishing:
            # Keep reading until a read would block: an empty source never wakes the reader up.
            self._loop.call_soon(self._read)
