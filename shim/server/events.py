"""Publishing task events to containerd, in order, over its ttrpc events service.

One sender task drains one queue, so events reach containerd in the order they were
published (create before start before exit before delete). A failed send is retried with
a fresh connection on the Go publisher's schedule (after 1, 2, 3, 4 and 5 s: an event
survives a containerd restart of up to ~15 s); an event that still cannot be delivered is
logged and dropped rather than blocking the shim forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shim.api.containerd.services.events.ttrpc.v1 import events_pb2
from shim.ttrpc import Client, TtrpcError

log = logging.getLogger(__name__)
NAMESPACE_KEY = "containerd-namespace-ttrpc"
EVENTS_SERVICE = events_pb2.DESCRIPTOR.services_by_name["Events"]
ATTEMPTS = 6  # the first try and 5 retries, as the Go publisher's maxRequeue
RETRY_DELAY = 1.0  # the n-th retry comes n * RETRY_DELAY after the previous failure (Go: n seconds)
CALL_TIMEOUT = 5.0


def pack(message: Message) -> Any:
    """An Any whose type URL is the bare full name, as containerd's typeurl registry expects."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class Publisher:
    def __init__(self, address: str, namespace: str, *,
                 connect: Callable[[str], Awaitable[Client]] = Client.connect,
                 retry_delay: float = RETRY_DELAY,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.address = address
        self.namespace = namespace
        self._connect = connect
        self._retry_delay = retry_delay
        self._sleep = sleep  # the retry schedule's clock; tests pass one that records instead of waiting
        self._queue: asyncio.Queue[events_pb2.ForwardRequest | None] = asyncio.Queue()
        self._client: Client | None = None
        self._sender: asyncio.Task | None = None

    def publish(self, topic: str, event: Message) -> None:
        envelope = events_pb2.Envelope(timestamp=timestamp(time.time()), namespace=self.namespace, topic=topic,
                                       event=pack(event))
        self._queue.put_nowait(events_pb2.ForwardRequest(envelope=envelope))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for at most `timeout` seconds), then disconnect."""
        if self._sender is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), timeout)
            except TimeoutError:
                self._sender.cancel()
                log.warning("dropped %d undelivered events at shutdown", self._queue.qsize())
        if self._client is not None:
            self._client.close()

    async def _send_all(self) -> None:
        while (request := await self._queue.get()) is not None:
            try:
                await self._send(request)
            except Exception:  # a bug must cost one event, not every event after it
                log.exception("publishing %s failed", request.envelope.topic)

    async def _send(self, request: events_pb2.ForwardRequest) -> None:
        topic = request.envelope.topic
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await self._connect(self.address)
                await self._client.stub(EVENTS_SERVICE, metadata={NAMESPACE_KEY: self.namespace}).Forward(
                    request, timeout=CALL_TIMEOUT)
                return
            except TtrpcError as exc:
                log.warning("publishing %s failed (attempt %d of %d): %s", topic, attempt, ATTEMPTS, exc)
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if attempt < ATTEMPTS:
                    await self._sleep(self._retry_delay * attempt)
        log.error("gave up publishing %s after %d attempts", topic, ATTEMPTS)
