"""The framed protocol over a pair of pipes (ssh's stdin and stdout on the source, the receiver's own on the
destination): one thread reads and sorts the frames, any thread sends.

Control messages queue up for whoever waits for the next one; archive chunks queue up (bounded, so a slow
destination disk slows the sender through ssh's flow control instead of filling memory) for the archive's reader;
page-server bytes go straight to the handler registered for them. End of stream, or bytes that are not the
protocol, wake every waiter with the reason.

The bulk of a migration (a GiB of pages) crosses here, on two cores shared with ssh's encryption at both ends: every
copy a byte makes in Python is time the transfer loses. So a frame is sent with one writev (header and payload as
they are), a file's contents go by sendfile(2) from the page cache into the pipe (send_file), each frame is read
into a buffer of its own size (no reassembly), and the pipes are widened to up to 1 MiB (64 KiB by default), so
that ssh and this side move several frames per wake-up rather than a quarter of one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import threading
import time
from collections.abc import Callable

from shim.tool.migrate import frames

# What bulk bytes that end in a file (a file's contents in the archive, the page stream's recording) travel and are
# written in. Not 1 MiB: on Linux 6.18's ext4 a write(2) of 1 MiB into the page cache was measured 3 to 10 times
# slower than four of 256 KiB (for 1 GiB: 0.7-3 s of system time against 0.2-0.3 s); frames of 256 KiB cost little.
PIECE = 256 << 10
PIPE_SIZE = 1 << 20  # what the pipes to ssh are widened to, within /proc/sys/fs/pipe-max-size
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
PageHandler = Callable[[frames.Payload], None]


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Ask for a pipe buffer of `size` bytes (capped at the system's pipe-max-size); the size it has then (0: fd is
    no pipe). A refusal only costs speed."""
    try:
        with open(PIPE_MAX_SIZE) as f:
            size = min(size, int(f.read()))
    except (OSError, ValueError):
        pass
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        try:
            return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            return 0


class ChannelClosed(Exception):
    """The peer went away (or spoke something else): the reason is the message."""


class Channel:
    def __init__(self, read_fd: int, write_fd: int, *, peer: str,
                 close_write: Callable[[], None] | None = None) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._close_write = close_write or (lambda: os.close(write_fd))
        self.peer = peer
        self.sent = 0  # payload bytes sent
        self.received = 0  # payload bytes of complete frames received
        self._send_lock = threading.Lock()
        self._messages: queue.Queue[dict | ChannelClosed] = queue.Queue()
        self._archive: queue.Queue[frames.Payload | ChannelClosed] = queue.Queue(maxsize=32)
        self.on_pages: PageHandler | None = None
        self.closed: ChannelClosed | None = None
        for fd in (read_fd, write_fd):
            widen_pipe(fd)
        self._reader = threading.Thread(target=self._read_loop, name="migrate-channel", daemon=True)

    def start(self) -> Channel:
        self._reader.start()
        return self

    # --- sending -----------------------------------------------------------------------------------------------

    def send(self, kind: bytes, payload: frames.Payload = b"") -> None:
        header = frames.header(kind, len(payload))
        with self._send_lock:
            try:
                self._write_all([header, payload])
            except OSError as exc:
                raise self._broken(exc) from None
            self.sent += len(payload)

    def send_message(self, message_type: str, **fields) -> None:
        self.send(frames.CONTROL, frames.message_payload(message_type, **fields))

    def send_file(self, kind: bytes, fd: int, offset: int, count: int, *, chunk: int = PIECE) -> None:
        """count bytes of the regular file fd from offset, in frames of `chunk` (the last one shorter), moved by
        sendfile(2) from the page cache into the pipe. A file shorter than count (cut while being sent) or a read
        error: the frame under way is completed with zeros, so that the stream stays whole, and the OSError is
        raised."""
        while count > 0:
            length = min(count, chunk)
            with self._send_lock:
                try:
                    self._write_all([frames.header(kind, length)])
                except OSError as exc:
                    raise self._broken(exc) from None
                moved = 0
                try:
                    while moved < length:
                        n = self._send_from_file(fd, offset + moved, length - moved)
                        if n == 0:
                            raise OSError(errno.ENODATA, f"the file ended at byte {offset + moved}, before the "
                                                         "bytes promised (cut while being sent)")
                        moved += n
                except OSError:
                    self._pad(length - moved)
                    raise
                finally:
                    self.sent += moved
            offset += length
            count -= length

    def _send_from_file(self, fd: int, offset: int, length: int) -> int:
        """Some of the bytes (0: the file has none there); ChannelClosed when the pipe broke."""
        try:
            return os.sendfile(self.write_fd, fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise self._broken(exc) from None
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
        return self._copy_from_file(fd, offset, length)  # a file system without sendfile

    def _copy_from_file(self, fd: int, offset: int, length: int) -> int:
        data = os.pread(fd, min(length, PIECE), offset)
        try:
            self._write_all([data])
        except OSError as exc:
            raise self._broken(exc) from None
        return len(data)

    def _pad(self, length: int) -> None:
        """Zeros in place of what a file did not give, the frame's header having promised them."""
        try:
            self._write_all([bytes(length)])
        except OSError as exc:
            raise self._broken(exc) from None

    def _write_all(self, buffers: list[frames.Payload]) -> None:
        views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
        while views:
            written = os.writev(self.write_fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def _broken(self, exc: OSError) -> ChannelClosed:
        return ChannelClosed(f"the connection to {self.peer} broke while sending ({exc.strerror})")

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
            while (frame := self._read_frame()) is not None:
                self.received += len(frame.payload)
                self._dispatch(frame)
        except frames.ProtocolError as exc:
            reason = f"{self.peer}: {exc}"
        except _CutShort:
            reason = f"{self.peer} closed the connection in the middle of a frame"
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

    def _read_frame(self) -> frames.Frame | None:
        """The next whole frame, its payload read straight into a buffer of its size; None at end of stream."""
        header = bytearray(frames.HEADER.size)
        got = self._read_into(memoryview(header))
        if got == 0:
            return None
        if got < len(header):
            # what came may still say it is not the protocol at all (a shell's greeting, shorter than a header)
            self._parse_header(bytes(header[:got]))
            raise _CutShort
        kind, length = self._parse_header(bytes(header))
        payload = bytearray(length)
        if self._read_into(memoryview(payload)) < length:
            raise _CutShort
        return frames.Frame(kind, payload)

    def _parse_header(self, header: bytes) -> tuple[bytes, int]:
        try:
            return frames.parse_header(header.ljust(frames.HEADER.size, b"\0"))
        except frames.ProtocolError:
            # say what came instead (a shell's "command not found", a login banner): what is there already, no wait
            more = os.read(self.read_fd, 80) if select.select([self.read_fd], [], [], 0.2)[0] else b""
            raise frames.ProtocolError(f"not pyshim's migrate protocol (read {(header + more)[:80]!r})") from None

    def _read_into(self, view: memoryview) -> int:
        """Fill view from the peer; the bytes read (fewer at end of stream)."""
        got = 0
        while got < len(view):
            n = os.readv(self.read_fd, [view[got:]])
            if n == 0:
                break
            got += n
        return got

    def _dispatch(self, frame: frames.Frame) -> None:
        if frame.kind == frames.CONTROL:
            self._messages.put(frame.message())
        elif frame.kind == frames.ARCHIVE:
            self._put_archive(frame.payload)
        elif self.on_pages is not None:
            self.on_pages(frame.payload)
        else:
            raise frames.ProtocolError("page-server bytes arrived with no page transfer going on")

    def _put_archive(self, item: frames.Payload | ChannelClosed) -> None:
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


class _CutShort(Exception):
    """The stream ended inside a frame."""


class ArchiveReader:
    """The archive's bytes as the file object tarfile reads (shim/tool/migrate/tarstream.py), ending at the empty
    D frame: read(n), and tell() and seek() forward only (tarfile skips to the next header by seeking).

    A read of exactly the next whole frame hands that frame's buffer over as it is (a file's contents arrive in
    such frames, read in such pieces); any other read is assembled, a copy of the few bytes concerned."""

    def __init__(self, channel: Channel, timeout: float | None) -> None:
        self.channel = channel
        self.timeout = timeout
        self._frame: frames.Payload = b""  # the frame being read
        self._used = 0  # of which this much was read
        self.done = False
        self.count = 0  # archive bytes received
        self.position = 0  # archive bytes read

    def read(self, size: int = -1) -> frames.Payload:
        if size == 0:
            return b""
        if size < 0:
            size = 1 << 62
        if self._used == len(self._frame) and not self.done:
            self._next_frame()
            if len(self._frame) == size:  # a whole frame: no copy
                self._used = size
                self.position += size
                return self._frame
        pieces = []
        wanted = size
        while wanted > 0:
            if self._used == len(self._frame):
                if self.done:
                    break
                self._next_frame()
                continue
            piece = memoryview(self._frame)[self._used:self._used + wanted]
            pieces.append(piece)
            self._used += len(piece)
            wanted -= len(piece)
        data = b"".join(pieces)
        self.position += len(data)
        return data

    def _next_frame(self) -> None:
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
        self._frame, self._used = item, 0
        self.count += len(item)

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.position + offset if whence == os.SEEK_CUR else -1
        if target < self.position:
            raise OSError(errno.ESPIPE, f"the archive stream reads forward only (seek to {offset}, whence {whence}, "
                                        f"at {self.position})")
        while self.position < target and self.read(min(target - self.position, PIECE)):
            pass
        return self.position

    def drain(self) -> None:
        """Read to the end of the archive (what the extraction did not need)."""
        while not self.done:
            self._frame, self._used = b"", 0
            self._next_frame()
        self._frame, self._used = b"", 0
