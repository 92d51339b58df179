"""An asyncio ttrpc client: concurrent unary calls on one unix-socket connection.

A call that cannot complete because the connection went away raises ConnectionLost, so a
caller (the event publisher, for one) can reconnect and retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from shim.ttrpc.protocol import ClientProtocol, ProtocolViolation, ResponseFailed, ResponseReceived
from shim.ttrpc.services import methods_of
from shim.ttrpc.status import Code, ConnectionLost, TtrpcError


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.protocol = ClientProtocol()
        self.transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, path: str, timeout: float | None = 5.0) -> Client:
        """Connect to a ttrpc server at a unix socket path ("unix://" prefix allowed)."""
        path = path.removeprefix("unix://")
        if not path.startswith("/"):
            path = "\0" + path  # no filesystem path: an abstract socket, as Go dials it
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, client = await loop.create_unix_connection(cls, path)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {path.lstrip(chr(0))}: {exc}") from exc
        return client

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def call(self, service: str, method: str, request: Message, response_type: type[Message], *,
                   timeout: float | None = None, metadata: Mapping[str, str] | None = None) -> Message:
        if self.closed or self.transport is None:
            raise ConnectionLost()
        timeout_nano = int(timeout * 1e9) if timeout else 0
        stream_id, frame = self.protocol.request(service, method, request.SerializeToString(), timeout_nano,
                                                 dict(metadata or {}))
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = reply
        self.transport.write(frame)
        try:
            async with asyncio.timeout(timeout):
                response = await reply
        except TimeoutError:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no reply within {timeout}s") from None
        finally:
            self._pending.pop(stream_id, None)
        if response.HasField("status") and response.status.code != Code.OK:
            raise TtrpcError(response.status.code, response.status.message)
        result = response_type()
        try:
            result.ParseFromString(response.payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INTERNAL, f"cannot decode {response_type.__name__}: {exc}") from None
        return result

    def stub(self, descriptor: ServiceDescriptor, *, metadata: Mapping[str, str] | None = None,
             timeout: float | None = None) -> Stub:
        return Stub(self, descriptor, metadata=metadata, timeout=timeout)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for event in self.protocol.receive(data):
            if isinstance(event, ProtocolViolation):
                self._fail_all(TtrpcError(Code.INTERNAL, f"protocol violation: {event.reason}"))
                self.close()
                return
            reply = self._pending.get(event.stream_id)
            if reply is None or reply.done():
                continue  # the caller gave up on it (timeout)
            if isinstance(event, ResponseReceived):
                reply.set_result(event.response)
            elif isinstance(event, ResponseFailed):
                reply.set_exception(event.error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionLost(f"ttrpc connection closed: {exc}" if exc else "ttrpc connection closed"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _fail_all(self, error: TtrpcError) -> None:
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(error)


class Stub:
    """Calls the RPCs of one service by name: `await stub.Forward(request)`."""

    def __init__(self, client: Client, descriptor: ServiceDescriptor, *, metadata: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> None:
        self._client = client
        self._service = descriptor.full_name
        self._methods = methods_of(descriptor)
        self._metadata = dict(metadata or {})
        self._timeout = timeout

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Message]]:
        try:
            method = self._methods[name]
        except KeyError:
            raise AttributeError(f"{self._service} has no method {name}") from None

        async def invoke(request: Message, *, timeout: float | None = None) -> Message:
            return await self._client.call(self._service, name, request, method.response_type,
                                           timeout=timeout if timeout is not None else self._timeout,
                                           metadata=self._metadata)

        return invoke
