"""The lazy-pages daemon's side of CRIU's page-server protocol (shim.criu.page_protocol): GET requests out, the
pages in, in the order asked (the protocol has no request ids), and the close handshake. shim.criu.page_server is
the other side."""

from __future__ import annotations

import collections
import select
import socket
import time

from shim.criu import page_protocol as protocol
from shim.criu.missing_pages import PAGE_SIZE

SEND_TIMEOUT = 30.0


class PageServerError(Exception):
    """The page server is lost, or answered what was not asked: the pages it still holds cannot come."""


class Request:
    """Pages [vaddr, vaddr + pages) of checkpoint process pid, asked for and not answered yet."""

    __slots__ = ("pid", "vaddr", "pages", "background")

    def __init__(self, pid: int, vaddr: int, pages: int, background: bool) -> None:
        self.pid = pid
        self.vaddr = vaddr
        self.pages = pages
        self.background = background

    def __repr__(self) -> str:
        return f"Request({self.pid}, {self.vaddr:#x}, {self.pages}, background={self.background})"

    def covers(self, pid: int, address: int) -> bool:
        return pid == self.pid and self.vaddr <= address < self.vaddr + self.pages * PAGE_SIZE


class PageSource:
    """The connection to the page server."""

    def __init__(self, sock: socket.socket, *, force_close: bool) -> None:
        self.sock = sock
        self.force_close = force_close
        self.in_flight: collections.deque[Request] = collections.deque()
        self._header = bytearray()
        self._answer: protocol.Request | None = None
        self._data = bytearray()
        self._filled = 0
        self.bytes = 0
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def ask(self, request: Request) -> None:
        self._send(protocol.encode_header(protocol.PS_IOV_GET, nr_pages=request.pages, vaddr=request.vaddr,
                                          dst_id=request.pid))
        self.in_flight.append(request)

    def _send(self, data: bytes) -> None:
        """Requests are 32 bytes: the socket takes them at once unless the page server stopped reading."""
        view = memoryview(data)
        deadline = time.monotonic() + SEND_TIMEOUT
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PageServerError(f"the page server has not read a request for {SEND_TIMEOUT:g} s") from None
                select.select([], [self.sock], [], 1)
            except OSError as exc:
                raise PageServerError(f"the page server's connection failed: {exc}") from None

    def answers(self) -> list[tuple[Request, int, bytearray]]:
        """Read what has come: (request, its first page's address, pages) for each answer completed."""
        done: list[tuple[Request, int, bytearray]] = []
        while True:
            chunk: bytes | memoryview
            try:
                if self._answer is None:
                    chunk = self.sock.recv(protocol.HEADER.size - len(self._header))
                else:
                    view = memoryview(self._data)[self._filled:]
                    chunk = view[:self.sock.recv_into(view)]
            except BlockingIOError:
                return done
            except OSError as exc:
                raise PageServerError(f"the page server's connection failed: {exc}") from None
            if not chunk:
                raise PageServerError(f"the page server closed the connection with {len(self.in_flight)} requests "
                                  "unanswered")
            if self._answer is None:
                self._header += chunk
                if len(self._header) == protocol.HEADER.size:
                    self._start_answer(protocol.decode_header(bytes(self._header)))
                    self._header.clear()
            else:
                self._filled += len(chunk)
            if self._answer is not None and self._filled == len(self._data):
                request = self.in_flight.popleft()
                done.append((request, self._answer.vaddr, self._data))
                self.bytes += len(self._data)
                self._answer, self._data, self._filled = None, bytearray(), 0

    def _start_answer(self, answer: protocol.Request) -> None:
        if not self.in_flight:
            raise PageServerError(f"the page server sent {answer.name} when nothing was asked")
        asked = self.in_flight[0]
        if answer.command not in (protocol.PS_IOV_ADD_F, protocol.PS_IOV_ADD) or answer.pid != asked.pid or \
                answer.vaddr != asked.vaddr or not 0 < answer.nr_pages <= asked.pages:
            raise PageServerError(f"the page server answered {answer.name} of {answer.nr_pages} pages of process "
                              f"{answer.pid} at {answer.vaddr:#x} to a request for {asked.pages} pages of process "
                              f"{asked.pid} at {asked.vaddr:#x}")
        self._answer = answer
        self._data = bytearray(answer.nr_pages * PAGE_SIZE)

    def close(self) -> None:
        """End the session as CRIU's daemon does: CLOSE (FORCE_CLOSE on a socket handed over), then its status."""
        self.sock.setblocking(True)
        self.sock.settimeout(10)
        try:
            self.sock.sendall(protocol.encode_header(protocol.PS_IOV_FORCE_CLOSE if self.force_close
                                                     else protocol.PS_IOV_CLOSE))
            status = self.sock.recv(protocol.STATUS.size)
        except OSError as exc:
            raise PageServerError(f"the page server did not answer the close: {exc}") from None
        finally:
            self.sock.close()
        if len(status) != protocol.STATUS.size or protocol.STATUS.unpack(status)[0] != 0:
            raise PageServerError(f"the page server closed the session with {status!r}")
