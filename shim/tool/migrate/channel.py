"""The framed protocol over a pair of pipes (ssh's stdin and stdout on the source, the receiver's own on the
destination): one thread reads and sorts the frames, any thread sends.

Control messages queue up for whoever waits for the next one; archive chunks queue up (bounded, so a slow
destination disk slows the sender through ssh's flow control instead of filling memory) for the archive's reader;
page-server bytes go straight to the handler registered for them. End of stream, or bytes that are not the
protocol, wake every waiter with the reason.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from shim.tool.migrate import frames

READ_SIZE = 1 << 20
CHUNK = 1 << 20


class ChannelClosed(Exception):
    """The peer went away (or spoke something else): the reason is the message."""


class Channel:
    def __init__(self, read_fd: int, write_fd: int, *, peer: str,
                 close_write: Callable[[], None] | None = None) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._close_write = close_write or (lambda: os.close(write_fd))
        self.peer = peer
        self.decoder = frames.Decoder()
        self.sent = 0  # payload bytes sent
        self._send_lock = threading.Lock()
        self._messages: queue.Queue[dict | ChannelClosed] = queue.Queue()
        self._archive: queue.Queue[bytes | ChannelClosed] = queue.Queue(maxsize=32)
        self.on_pages: Callable[[bytes], None] | None = None
        self.closed: ChannelClosed | None = None
        self._reader = threading.Thread(target=self._read_loop, name="migrate-channel", daemon=True)

    def start(self) -> Channel:
        self._reader.start()
        return self

    @property
    def received(self) -> int:
        return self.decoder.received

    # --- sending -----------------------------------------------------------------------------------------------

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        data = frames.encode(kind, payload)
        with self._send_lock:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self.write_fd, view)
                    view = view[written:]
            except OSError as exc:
                raise ChannelClosed(f"the connection to {self.peer} broke while sending ({exc.strerror})") from None
            self.sent += len(payload)

    def send_message(self, message_type: str, **fields) -> None:
        self.send(frames.CONTROL, frames.message_payload(message_type, **fields))

    def close_sending(self) -> None:
        """No more frames from this side: the peer reads end of stream."""
        with self._send_lock:
            try:
                self._close_write()
            except OSError:
                pass

    # --- receiving ---------------------------------------------------------------------------------------------

    def next_message(self, timeout: float | None = None, *, waiting_for: str = "an answer") -> dict:
        try:
            item = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.peer} sent no {waiting_for} within {timeout:g} s") from None
        if isinstance(item, ChannelClosed):
            self._messages.put(item)  # for the next waiter too
            raise item
        return item

    def archive_reader(self, timeout: float | None = None) -> ArchiveReader:
        return ArchiveReader(self, timeout)

    def _read_loop(self) -> None:
        reason = f"{self.peer} closed the connection"
        try:
            while True:
                data = os.read(self.read_fd, READ_SIZE)
                if not data:
                    if self.decoder.pending():
                        reason = f"{self.peer} closed the connection in the middle of a frame"
                    break
                for frame in self.decoder.feed(data):
                    self._dispatch(frame)
        except frames.ProtocolError as exc:
            reason = f"{self.peer}: {exc}"
        except OSError as exc:
            reason = f"reading from {self.peer} failed ({exc.strerror})"
        except ChannelClosed as exc:
            reason = str(exc)
        self.closed = ChannelClosed(reason)
        self._messages.put(self.closed)
        self._put_archive(self.closed)
        if self.on_pages is not None:
            try:
                self.on_pages(b"")
            except Exception:  # noqa: BLE001 - the handler's own failure is reported through its owner
                pass

    def _dispatch(self, frame: frames.Frame) -> None:
        if frame.kind == frames.CONTROL:
            self._messages.put(frame.message())
        elif frame.kind == frames.ARCHIVE:
            self._put_archive(frame.payload)
        elif self.on_pages is not None:
            self.on_pages(frame.payload)
        else:
            raise frames.ProtocolError("page-server bytes arrived with no page transfer going on")

    def _put_archive(self, item: bytes | ChannelClosed) -> None:
        while True:
            try:
                self._archive.put(item, timeout=1.0)
                return
            except queue.Full:
                if isinstance(item, ChannelClosed):
                    # nobody reads the archive: make room for the news that it ends
                    try:
                        self._archive.get_nowait()
                    except queue.Empty:
                        pass


class ArchiveReader:
    """The archive's bytes as a file object tarfile's stream mode reads (read(n)), ending at the empty D frame."""

    def __init__(self, channel: Channel, timeout: float | None) -> None:
        self.channel = channel
        self.timeout = timeout
        self._buffer = b""
        self.done = False
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        while not self.done and (size < 0 or len(self._buffer) < size):
            started = time.monotonic()
            try:
                item = self.channel._archive.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError(f"no archive data from {self.channel.peer} for "
                                   f"{time.monotonic() - started:.0f} s") from None
            if isinstance(item, ChannelClosed):
                self.channel._put_archive(item)  # for the next read (a drain after a failure) too
                raise item
            if not item:
                self.done = True
            self._buffer += item
            self.count += len(item)
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def drain(self) -> None:
        """Read to the end of the archive (what the extraction did not need)."""
        while not self.done:
            self._buffer = b""
            self.read(READ_SIZE)
        self._buffer = b""


class ArchiveWriter:
    """A write-only file object whose bytes go out as archive frames (tarfile's stream mode writes to it)."""

    def __init__(self, channel: Channel, progress: Callable[[int], None] | None = None) -> None:
        self.channel = channel
        self.progress = progress
        self._buffer = bytearray()
        self.count = 0

    def write(self, data) -> int:
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            self._flush_chunk(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self._buffer:
            self._flush_chunk(bytes(self._buffer))
            self._buffer.clear()
        self.channel.send(frames.ARCHIVE, b"")

    def _flush_chunk(self, chunk: bytes) -> None:
        self.channel.send(frames.ARCHIVE, chunk)
        self.count += len(chunk)
        if self.progress is not None:
            self.progress(len(chunk))
