"""pyshim's page server for post-copy: it answers a destination's lazy-pages daemon (pyshim's,
shim.criu.lazy_daemon, or `criu lazy-pages --page-server`) from a checkpoint's images, the role CRIU gives its own
lazy dump (`criu dump --lazy-pages`), which fails on the machines pyshim is built on (docs/migrate.md says why).

The source dumps the container (images in memory, a tmpfs), `lazy_images.split` makes the images the destination
restores from, and this server serves the pages left out, one session: the destination's daemon asks for a page
when a restored process faults on it and for the rest in the background; the server reads each from the original
pages file (shim.criu.lazy_images.LazyPages) and sends it (shim.criu.page_protocol). It listens on a unix socket (a
migration forwards it over its ssh connection) or on a loopback address, never elsewhere: the pages are the
container's memory and the protocol has no authentication.

Run as `python -m shim.criu.page_server --images DIR (--unix PATH | --listen 127.0.0.1:PORT)`: it prints one JSON
object a line (listening, connected, progress, done) and exits 0 once every page was served and the daemon said
goodbye, 2 when the daemon said goodbye before asking for every page (its processes exited or unmapped some, or it
gave up: the destination knows which), 1 when the session failed (connection lost, timeout, bad request). The
images are removed only after every page was served, and only with --remove-when-done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from shim.criu import page_protocol as protocol
from shim.criu.lazy_images import PAGE_SIZE, ImageFormatError, LazyPages

PROGRESS_EVERY = 0.25  # seconds between progress lines
GOODBYE_WAIT = 5.0  # seconds for the daemon to close after the close handshake
EXIT_COMPLETE, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 2


@dataclass
class Outcome:
    served: int
    total: int
    closed: bool  # the daemon ended the session with CLOSE (or FORCE_CLOSE)
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.closed and not self.error and self.served >= self.total


class PageServer:
    """One session with one lazy-pages daemon."""

    def __init__(self, pages: LazyPages, *, rate: float = 0.0, report: Callable[[dict], None] = lambda _: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.pages = pages
        self.rate = rate  # bytes a second; 0: as fast as the connection takes them
        self.report = report
        self.clock = clock
        self._files: dict[str, BinaryIO] = {}
        self._sent = 0
        self._started = 0.0
        self._last_report = 0.0

    async def serve(self, sock: socket.socket) -> Outcome:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a faulting process waits for each answer
        reader = protocol.RequestReader()
        self._started = time.monotonic()
        closed, error = False, ""
        try:
            while not closed:
                data = await loop.sock_recv(sock, 1 << 16)
                if not data:
                    if reader.pending:
                        error = f"the connection closed in the middle of a request ({reader.pending} bytes)"
                    else:
                        error = "the connection closed without the close handshake"
                    break
                for request in reader.feed(data):
                    if request.command == protocol.PS_IOV_GET:
                        await self._send_pages(loop, sock, request)
                    elif request.command in (protocol.PS_IOV_CLOSE, protocol.PS_IOV_FORCE_CLOSE):
                        await loop.sock_sendall(sock, protocol.close_answer(0))
                        closed = True
                        if request.command == protocol.PS_IOV_CLOSE:
                            await self._wait_goodbye(loop, sock)
                        break
                    else:
                        raise protocol.ProtocolError(f"unexpected {request.name} from the lazy-pages daemon")
        except (protocol.ProtocolError, OSError) as exc:
            error = str(exc)
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()
        outcome = Outcome(self.pages.served, self.pages.total, closed, error)
        return outcome

    async def _send_pages(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          request: protocol.Request) -> None:
        where = self.pages.locate(request.pid, request.vaddr, request.nr_pages)
        if where is None or request.nr_pages == 0:
            raise protocol.ProtocolError(f"asked for {request.nr_pages} pages of process {request.pid} at "
                                         f"{request.vaddr:#x}, where the checkpoint has no lazy page")
        path, offset, count = where
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open for the session, closed in serve()
        data = os.pread(f.fileno(), count * PAGE_SIZE, offset)
        if len(data) != count * PAGE_SIZE:
            raise protocol.ProtocolError(f"{path} ends before the pages at {offset} (the checkpoint is damaged)")
        # Header and pages in one write: a header sent alone waits for the peer's delayed ACK (Nagle), ~40 ms a fault.
        await loop.sock_sendall(sock, protocol.pages_answer(request, count) + data)
        self.pages.mark_served(request.pid, request.vaddr, count)
        self._sent += count * PAGE_SIZE
        await self._keep_rate()
        now = time.monotonic()
        if now - self._last_report >= PROGRESS_EVERY or self.pages.complete:
            self._last_report = now
            self.report({"event": "progress", "served": self.pages.served, "total": self.pages.total,
                         "bytes": self._sent, "t": self.clock()})

    async def _keep_rate(self) -> None:
        if self.rate > 0:
            ahead = self._sent / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _wait_goodbye(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """After the close answer the daemon closes its end; wait for that (bounded), as CRIU's page server does."""
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(loop.sock_recv(sock, 1), GOODBYE_WAIT)


def listening_socket(*, unix: str = "", listen: str = "") -> socket.socket:
    """A socket listening for one connection: at the unix path (made owner-only) or at a loopback HOST:PORT."""
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(unix)
        finally:
            os.umask(old)
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback or not port.isdigit():
            raise ValueError(f"--listen {listen!r}: give a loopback ADDRESS:PORT (the protocol has no "
                             "authentication: reach the server from elsewhere through ssh)")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1)
    sock.setblocking(False)
    return sock


async def run(args: argparse.Namespace, emit: Callable[[dict], None]) -> int:
    try:
        pages = LazyPages.load(args.images)
    except (OSError, ImageFormatError) as exc:
        emit({"event": "done", "error": f"cannot read the checkpoint {args.images}: {exc}", "t": time.time()})
        return EXIT_FAILED
    listener = listening_socket(unix=args.unix, listen=args.listen)
    host, port = listener.getsockname()[:2] if not args.unix else ("", 0)
    address = args.unix or f"{host}:{port}"
    emit({"event": "listening", "address": address, "total": pages.total, "pid": os.getpid(), "t": time.time()})
    loop = asyncio.get_running_loop()
    try:
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), args.accept_timeout)
        except TimeoutError:
            emit({"event": "done", "served": 0, "total": pages.total, "closed": False, "t": time.time(),
                  "error": f"no lazy-pages daemon connected within {args.accept_timeout:g}s"})
            return EXIT_FAILED
    finally:
        listener.close()
        if args.unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.unix)
    emit({"event": "connected", "t": time.time()})
    server = PageServer(pages, rate=args.rate, report=emit)
    with conn:
        try:
            outcome = await asyncio.wait_for(server.serve(conn), args.timeout)
        except TimeoutError:
            outcome = Outcome(pages.served, pages.total, False, f"not done within {args.timeout:g}s")
    removed = False
    if outcome.complete and args.remove_when_done:
        shutil.rmtree(args.images, ignore_errors=True)
        removed = True
    emit({"event": "done", "served": outcome.served, "total": outcome.total, "closed": outcome.closed,
          "error": outcome.error, "removed": removed, "t": time.time()})
    if outcome.complete:
        return EXIT_COMPLETE
    return EXIT_INCOMPLETE if outcome.closed and not outcome.error else EXIT_FAILED


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shim.criu.page_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="the checkpoint's original images (all pages)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", default="", help="listen on this unix socket path (owner only)")
    where.add_argument("--listen", default="", help="listen on this loopback ADDRESS:PORT (port 0: any)")
    parser.add_argument("--rate", type=float, default=0.0, help="at most this many bytes a second (0: no limit)")
    parser.add_argument("--accept-timeout", type=float, default=120.0, help="seconds for the daemon to connect")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole session")
    parser.add_argument("--remove-when-done", action="store_true",
                        help="remove the images once every page was served")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def emit(event: dict) -> None:
        print(json.dumps(event, separators=(",", ":")), flush=True)

    try:
        return asyncio.run(run(args, emit))
    except (OSError, ValueError) as exc:
        emit({"event": "done", "error": str(exc), "t": time.time()})
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
