"""--post-copy: the container runs on the destination before its memory has moved; its pages follow through the
migration's own ssh connection. The source dumps into memory (a directory on /dev/shm, a tmpfs), sends the images
without the pages CRIU marks lazy (shim.criu.lazy_images.split: ~1 MiB whatever the container's size), and serves
those pages with pyshim's page server (shim.criu.page_server, in a thread of this command) on one end of a socket
pair. On the destination the receiver listens on a unix socket in a private directory and names it in the images'
record; the shim's lazy restore connects to it and hands the connection to its lazy-pages daemon
(shim.criu.lazy_daemon, --ps-socket). Between the two sockets the page-server bytes travel as P frames, both ways,
as --stream's do: no port is opened on either host and no ssh forwarding is needed.

The source keeps its images until every page has moved (the page server removes them then). If the connection, the
page server or the destination's daemon fails before that, the destination's shim kills the container (its memory
can no longer all come; shim.criu.restore) and the source's full images stay where they were, named in the error.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable

from shim.criu.page_server import Outcome
from shim.tool.errors import ToolError
from shim.tool.migrate import frames
from shim.tool.migrate.channel import Channel, ChannelClosed

CHUNK = 1 << 20
MEMORY_DIR = "/dev/shm"  # tmpfs on every Linux: the dump never touches a disk
ACCEPT_TIMEOUT = 120.0  # for the shim's lazy restore to connect, on the destination
SOCKET_NAME = "pages.sock"
SOCKET_DIR = "/run"  # root's tmpfs: short paths


def memory_directory(container_id: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"pyshim-postcopy-{container_id}-", dir=MEMORY_DIR)


class _Relay:
    """One socket's bytes out as P frames, P frames in to the socket; an empty P frame ends a direction."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel = channel
        self.socket: socket.socket | None = None
        self.sent = 0
        self.received = 0
        self.ended = threading.Event()  # the socket's side ended (EOF or error) and the end was sent
        self.error = ""
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)

    def attach(self, sock: socket.socket) -> None:
        self.socket = sock
        self.channel.on_pages = self._from_peer
        self._thread.start()

    def _pump(self) -> None:
        assert self.socket is not None
        try:
            while data := self.socket.recv(CHUNK):
                self.channel.send(frames.PAGES, data)
                self.sent += len(data)
            self.channel.send(frames.PAGES, b"")
        except (OSError, ChannelClosed) as exc:
            self.error = str(exc)
            # Nobody reads this socket any more: its peer (the page server, or CRIU's daemon) must not block
            # writing into it, but learn now that the other side is gone.
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self.ended.set()

    def _from_peer(self, data: frames.Payload) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            if data:
                sock.sendall(data)
                self.received += len(data)
            else:
                sock.shutdown(socket.SHUT_WR)  # the other side ended (or the connection to it was lost)
        except OSError:
            pass  # our end went away: its own owner says why

    def close(self) -> None:
        if self.channel.on_pages == self._from_peer:
            self.channel.on_pages = None
        if self.socket is not None:
            try:
                self.socket.close()
            except OSError:
                pass


class SourcePages:
    """The source's end: pyshim's page server on a socket pair, serving the full images in memory."""

    def __init__(self, channel: Channel, images: str, *, report: Callable[[dict], None], rate: float = 0.0) -> None:
        from shim.criu.lazy_images import LazyPages
        from shim.criu.page_server import PageServer

        self.images = images
        self.pages = LazyPages.load(images)
        self.report = report
        self.outcome: Outcome | None = None
        self.started = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server_socket = ours
        self._server = PageServer(self.pages, report=report, rate=rate)
        self._thread = threading.Thread(target=self._serve, name="migrate-page-server", daemon=True)
        self._thread.start()
        self.relay = _Relay(channel, "migrate-postcopy-source")
        self.relay.attach(theirs)

    @property
    def total(self) -> int:
        return self.pages.total

    def _serve(self) -> None:
        try:
            self.outcome = asyncio.run(self._server.serve(self._server_socket))
        finally:
            self._server_socket.close()

    def wait(self, timeout: float) -> dict:
        """The page server's end: the daemon said goodbye (ToolError otherwise: the connection lost, a bad
        request, the timeout). It says goodbye after its last page and also when it gives up; pages it never asked
        for are those of processes that exited, or of memory they unmapped, unless it gave up: `served` < `pages`
        then leaves the verdict to the destination (Migration._wait_pages)."""
        self._thread.join(timeout)
        outcome = self.outcome
        if self._thread.is_alive():
            self.close()
            self._thread.join(10)
            raise ToolError(f"the pages had not all moved within {timeout:g} s ({self.pages.served} of "
                            f"{self.pages.total})")
        assert outcome is not None
        if outcome.error or not outcome.closed:
            raise ToolError(f"the page transfer ended after {outcome.served} of {outcome.total} pages: "
                            f"{outcome.error or 'the session ended without the close handshake'}")
        return {"pages": outcome.total, "served": outcome.served, "page_bytes": self.relay.sent,
                "pages_ms": round((time.monotonic() - self.started) * 1000, 1)}

    def remove_images(self) -> None:
        shutil.rmtree(os.path.dirname(self.images), ignore_errors=True)

    def close(self) -> None:
        self.relay.close()
        try:
            self._server_socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DestinationPages:
    """The destination's end: a unix socket in a private directory of /run (a work directory's path can exceed a
    socket address's 108 bytes), which the shim's lazy restore connects to; one connection, relayed to the
    source."""

    def __init__(self, channel: Channel, container_id: str) -> None:
        import tempfile

        self.directory = tempfile.mkdtemp(prefix=f"pyshim-postcopy-{container_id[:32]}-", dir=SOCKET_DIR)
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(1)
        self.listener.settimeout(ACCEPT_TIMEOUT)
        self.relay = _Relay(channel, "migrate-postcopy-destination")
        self.connected = threading.Event()
        self._accepting = threading.Thread(target=self._accept, name="migrate-postcopy-accept", daemon=True)
        self._accepting.start()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError as exc:  # closed by undo(), or nobody came in time
            self.relay.error = f"the lazy restore never connected ({exc})"
            self.relay.ended.set()
            return
        finally:
            self.listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.connected.set()
        self.relay.attach(connection)

    def wait(self, timeout: float) -> bool:
        """Until the shim's daemon has ended its side (every page in, or it failed); whether it did in time."""
        return self.relay.ended.wait(timeout)

    def close(self) -> None:
        try:
            self.listener.close()
        except OSError:
            pass
        self.relay.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def name_page_server(images: str, address: str) -> None:
    """Write where the pages are into the split images' record, which the shim's restore reads."""
    import json

    from shim.criu.lazy_images import RECORD, RECORD_KEY

    path = os.path.join(images, RECORD)
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record.get(RECORD_KEY), dict):
        raise ToolError("the migrated checkpoint is not one split for post-copy (its record says nothing of it)")
    record[RECORD_KEY]["page_server"] = address
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
