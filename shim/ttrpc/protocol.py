"""The ttrpc protocol state of one connection, for either end, without I/O.

Feed received bytes in, get events out; ask for the bytes of a request or reply and write
them yourself. The transports in server.py and client.py are the only users; tests drive
these classes directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from shim.api.ttrpc.request_pb2 import KeyValue, Request, Response
from shim.api.ttrpc.status_pb2 import Status
from shim.ttrpc.framing import (
    MAX_PAYLOAD,
    Flags,
    Frame,
    FrameReader,
    FrameTooLarge,
    FrameType,
    OversizedFrame,
    encode_frame,
)
from shim.ttrpc.status import Code, TtrpcError


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    request: Request


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """A request the server must refuse on its stream without calling a handler."""

    stream_id: int
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    response: Response


@dataclass(frozen=True, slots=True)
class ResponseFailed:
    """A reply that arrived for a stream but could not be read."""

    stream_id: int
    error: TtrpcError


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer does not speak ttrpc; the only safe reaction is to close the connection."""

    reason: str


ServerEvent = RequestReceived | StreamRejected | ProtocolViolation
ClientEvent = ResponseReceived | ResponseFailed | ProtocolViolation


def _too_large(length: int, limit: int) -> str:
    return f"message length {length} exceeds the maximum message size of {limit}"


@dataclass
class ServerProtocol:
    max_payload: int = MAX_PAYLOAD
    _reader: FrameReader = field(init=False)
    _last_stream_id: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._reader = FrameReader(self.max_payload)

    def receive(self, data: bytes) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        for frame in self._reader.feed(data):
            event = self._on_frame(frame)
            if event is not None:
                events.append(event)
                if isinstance(event, ProtocolViolation):
                    break
        return events

    def _on_frame(self, frame: Frame | OversizedFrame) -> ServerEvent | None:
        if frame.type == FrameType.DATA:
            return None  # no method here streams; stray data frames are dropped
        if frame.type != FrameType.REQUEST:
            return ProtocolViolation(f"unexpected frame type {frame.type} from a client")
        sid = frame.stream_id
        if sid % 2 != 1:
            return StreamRejected(sid, Code.INVALID_ARGUMENT, "stream id must be odd for client-initiated streams")
        if sid <= self._last_stream_id:
            return StreamRejected(sid, Code.INVALID_ARGUMENT, "stream id cannot be reused and must increase")
        self._last_stream_id = sid
        if isinstance(frame, OversizedFrame):
            return StreamRejected(sid, Code.RESOURCE_EXHAUSTED, _too_large(frame.length, self.max_payload))
        if frame.flags & Flags.REMOTE_OPEN:
            return StreamRejected(sid, Code.UNIMPLEMENTED, "streaming requests are not supported")
        request = Request()
        try:
            request.ParseFromString(frame.payload)
        except DecodeError:
            return StreamRejected(sid, Code.INVALID_ARGUMENT, "malformed request")
        return RequestReceived(sid, request)

    def reply(self, stream_id: int, payload: bytes) -> bytes:
        """The frame answering stream_id; a reply too large to send becomes an error status."""
        data = Response(payload=payload).SerializeToString()
        try:
            return encode_frame(stream_id, FrameType.RESPONSE, data, max_payload=self.max_payload)
        except FrameTooLarge as exc:
            return self.reply_error(stream_id, Code.RESOURCE_EXHAUSTED, f"reply too large: {exc}")

    def reply_error(self, stream_id: int, code: Code, message: str) -> bytes:
        # Bound the message so that an error reply itself always fits in a frame.
        status = Status(code=int(code), message=message[: self.max_payload // 2])
        data = Response(status=status).SerializeToString()
        return encode_frame(stream_id, FrameType.RESPONSE, data, max_payload=self.max_payload)


@dataclass
class ClientProtocol:
    max_payload: int = MAX_PAYLOAD
    _reader: FrameReader = field(init=False)
    _next_stream_id: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        self._reader = FrameReader(self.max_payload)

    def request(self, service: str, method: str, payload: bytes, timeout_nano: int = 0,
                metadata: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A new stream id and the frame carrying the request on it."""
        request = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano,
                          metadata=[KeyValue(key=k, value=v) for k, v in (metadata or {}).items()])
        data = request.SerializeToString()
        if len(data) > self.max_payload:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, _too_large(len(data), self.max_payload))
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        return stream_id, encode_frame(stream_id, FrameType.REQUEST, data)

    def receive(self, data: bytes) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        for frame in self._reader.feed(data):
            if frame.type == FrameType.DATA:
                continue
            if frame.type != FrameType.RESPONSE:
                events.append(ProtocolViolation(f"unexpected frame type {frame.type} from a server"))
                break
            if isinstance(frame, OversizedFrame):
                error = TtrpcError(Code.RESOURCE_EXHAUSTED, _too_large(frame.length, self.max_payload))
                events.append(ResponseFailed(frame.stream_id, error))
                continue
            response = Response()
            try:
                response.ParseFromString(frame.payload)
            except DecodeError:
                events.append(ResponseFailed(frame.stream_id, TtrpcError(Code.INTERNAL, "malformed response")))
                continue
            events.append(ResponseReceived(frame.stream_id, response))
        return events
