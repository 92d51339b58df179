from shim.api.ttrpc.request_pb2 import Request, Response
from shim.ttrpc.framing import HEADER, FrameReader, FrameType, encode_frame
from shim.ttrpc.protocol import (
    ClientProtocol,
    ProtocolViolation,
    RequestReceived,
    ResponseFailed,
    ResponseReceived,
    ServerProtocol,
    StreamRejected,
)
from shim.ttrpc.status import Code


def request_frame(stream_id, service="svc", method="M", payload=b"", flags=0):
    data = Request(service=service, method=method, payload=payload).SerializeToString()
    return encode_frame(stream_id, FrameType.REQUEST, data, flags=flags)


def decode_reply(data):
    (frame,) = FrameReader().feed(data)
    response = Response()
    response.ParseFromString(frame.payload)
    return frame.stream_id, response


def test_client_stream_ids_are_odd_and_increasing():
    client = ClientProtocol()
    ids = [client.request("s", "m", b"")[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_client_request_reaches_server_with_metadata_and_timeout():
    client, server = ClientProtocol(), ServerProtocol()
    _, frame = client.request("svc", "Do", b"payload", timeout_nano=5, metadata={"k": "v"})
    (event,) = server.receive(frame)
    assert isinstance(event, RequestReceived)
    assert (event.request.service, event.request.method, event.request.payload) == ("svc", "Do", b"payload")
    assert event.request.timeout_nano == 5
    assert [(kv.key, kv.value) for kv in event.request.metadata] == [("k", "v")]


def test_server_rejects_even_and_reused_stream_ids():
    server = ServerProtocol()
    events = server.receive(request_frame(2) + request_frame(5) + request_frame(3) + request_frame(5))
    assert [type(e) for e in events] == [StreamRejected, RequestReceived, StreamRejected, StreamRejected]
    assert {e.code for e in events if isinstance(e, StreamRejected)} == {Code.INVALID_ARGUMENT}


def test_server_answers_oversized_request_and_keeps_going():
    server = ServerProtocol(max_payload=64)
    oversized = HEADER.pack(1000, 1, FrameType.REQUEST, 0) + b"z" * 1000
    events = server.receive(oversized + request_frame(3))
    assert isinstance(events[0], StreamRejected) and events[0].code == Code.RESOURCE_EXHAUSTED
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3


def test_server_rejects_garbage_payload_and_streaming_requests():
    server = ServerProtocol()
    garbage = encode_frame(1, FrameType.REQUEST, b"\xff\xff\xff")
    events = server.receive(garbage + request_frame(3, flags=0x2))
    assert [(e.stream_id, e.code) for e in events] == [(1, Code.INVALID_ARGUMENT), (3, Code.UNIMPLEMENTED)]


def test_server_treats_response_frames_as_a_protocol_violation():
    server = ServerProtocol()
    (event,) = server.receive(encode_frame(1, FrameType.RESPONSE, b""))
    assert isinstance(event, ProtocolViolation)


def test_reply_too_large_becomes_resource_exhausted_status():
    server = ServerProtocol(max_payload=128)
    stream_id, response = decode_reply(server.reply(9, b"x" * 500))
    assert stream_id == 9
    assert response.status.code == Code.RESOURCE_EXHAUSTED
    assert response.payload == b""


def test_client_reads_replies_out_of_order_and_errors():
    client, server = ClientProtocol(), ServerProtocol()
    data = server.reply(3, b"three") + server.reply_error(1, Code.NOT_FOUND, "nope")
    events = client.receive(data)
    assert [(type(e), e.stream_id) for e in events] == [(ResponseReceived, 3), (ResponseReceived, 1)]
    assert events[0].response.payload == b"three"
    assert (events[1].response.status.code, events[1].response.status.message) == (Code.NOT_FOUND, "nope")


def test_client_reports_oversized_and_malformed_replies_per_stream():
    client = ClientProtocol(max_payload=32)
    data = HEADER.pack(100, 1, FrameType.RESPONSE, 0) + b"q" * 100 + encode_frame(3, FrameType.RESPONSE, b"\xff\xff")
    events = client.receive(data)
    assert all(isinstance(e, ResponseFailed) for e in events)
    assert [(e.stream_id, e.error.code) for e in events] == [(1, Code.RESOURCE_EXHAUSTED), (3, Code.INTERNAL)]
