"""An asyncio ttrpc server over unix sockets.

Requests on one connection run concurrently (containerd's Wait blocks for as long as the
process lives). A request's timeout_nano becomes its deadline. Only peers whose effective
uid and gid equal ours are served, as containerd's own ttrpc servers require.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import cast

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from shim.api.ttrpc.request_pb2 import Request
from shim.ttrpc.protocol import ProtocolViolation, RequestReceived, ServerProtocol, StreamRejected
from shim.ttrpc.services import Method, bind
from shim.ttrpc.status import Code, TtrpcError

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    metadata: dict[str, list[str]]
    deadline: float | None  # loop time, or None without a timeout
    # Done when the call's connection has closed: one future per connection, so it also tells calls from the
    # same peer (containerd keeps one connection to a shim) from another's.
    disconnected: asyncio.Future | None = None

    def first(self, key: str, default: str = "") -> str:
        values = self.metadata.get(key)
        return values[0] if values else default


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


@dataclass
class Server:
    """Serves registered services; `allowed_peer` is the (uid, gid) a peer must have."""

    allowed_peer: tuple[int, int] | None = field(default_factory=lambda: (os.geteuid(), os.getegid()))
    max_payload: int | None = None
    _routes: dict[tuple[str, str], Method] = field(default_factory=dict, init=False)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list, init=False)
    _connections: set[_ServerConnection] = field(default_factory=set, init=False)

    def register(self, descriptor: ServiceDescriptor, implementation: object) -> None:
        for name, method in bind(descriptor, implementation).items():
            self._routes[(descriptor.full_name, name)] = method

    @property
    def services(self) -> set[str]:
        return {service for service, _ in self._routes}

    async def listen(self, sock: socket.socket) -> None:
        """Serve on a bound, listening unix socket."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _ServerConnection(self), sock=sock)
        self._servers.append(server)

    async def listen_path(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(128)
        await self.listen(sock)

    async def shutdown(self, grace: float = 3.0) -> None:
        """Stop accepting, let calls in flight finish for up to `grace` seconds, then close."""
        for server in self._servers:
            server.close()
        calls = [task for conn in self._connections for task in conn.calls]
        if calls:
            _, pending = await asyncio.wait(calls, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def route(self, service: str, method: str) -> Method | None:
        return self._routes.get((service, method))


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.protocol = ServerProtocol(**({"max_payload": server.max_payload} if server.max_payload else {}))
        self.transport: asyncio.Transport | None = None
        self.calls: set[asyncio.Task] = set()
        self.disconnected: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a unix stream server's transports are read-write Transports
        self.transport = stream
        allowed = self.server.allowed_peer
        if allowed is not None:
            pid, uid, gid = peer_credentials(transport.get_extra_info("socket"))
            if (uid, gid) != allowed:
                log.warning("refused ttrpc peer pid %d: uid %d gid %d, want %d %d", pid, uid, gid, *allowed)
                stream.abort()
                return
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        for task in self.calls:
            task.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        for event in self.protocol.receive(data):
            if isinstance(event, RequestReceived):
                task = asyncio.get_running_loop().create_task(self._call(event))
                self.calls.add(task)
                task.add_done_callback(self.calls.discard)
            elif isinstance(event, StreamRejected):
                self._write(self.protocol.reply_error(event.stream_id, event.code, event.message))
            elif isinstance(event, ProtocolViolation):
                log.warning("closing ttrpc connection: %s", event.reason)
                self.close()
                return

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _call(self, event: RequestReceived) -> None:
        request = event.request
        try:
            payload = await self._dispatch(request)
        except TtrpcError as exc:
            self._write(self.protocol.reply_error(event.stream_id, exc.code, exc.message))
        except asyncio.CancelledError:
            self._write(self.protocol.reply_error(event.stream_id, Code.CANCELLED, "server shutting down"))
            raise
        except Exception as exc:  # a handler bug must cost one call, not the server
            log.exception("%s/%s failed", request.service, request.method)
            self._write(self.protocol.reply_error(event.stream_id, Code.UNKNOWN, str(exc) or type(exc).__name__))
        else:
            self._write(self.protocol.reply(event.stream_id, payload))

    async def _dispatch(self, request: Request) -> bytes:
        method = self.server.route(request.service, request.method)
        if method is None or method.handler is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"{request.service}/{request.method} is not implemented")
        message = method.request_type()
        try:
            message.ParseFromString(request.payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"cannot decode {method.request_type.__name__}: {exc}") from None
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        context = CallContext(request.service, request.method, metadata, deadline, self.disconnected)
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                reply = await method.handler(message, context)
        except TimeoutError:
            if scope.expired():
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{request.method}: deadline exceeded") from None
            raise
        return reply.SerializeToString()

