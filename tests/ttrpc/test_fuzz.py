"""Random and mutated byte streams never crash the parsers: every input ends in events."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.api.ttrpc.request_pb2 import Request
from shim.ttrpc.framing import FrameType, encode_frame
from shim.ttrpc.protocol import ClientProtocol, ProtocolViolation, ServerProtocol

EVENT_TYPES = ("RequestReceived", "StreamRejected", "ProtocolViolation", "ResponseReceived", "ResponseFailed")


def valid_stream(n):
    return b"".join(
        encode_frame(2 * i + 1, FrameType.REQUEST, Request(service="s", method=str(i)).SerializeToString())
        for i in range(n)
    )


@st.composite
def mutated_streams(draw):
    data = bytearray(valid_stream(draw(st.integers(1, 6))))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def chunks(data, sizes):
    pos = 0
    for size in sizes:
        yield data[pos:pos + size]
        pos += size
    yield data[pos:]


def feed(protocol, data, sizes):
    events = []
    for chunk in chunks(data, sizes):
        events += protocol.receive(chunk)
        if any(isinstance(e, ProtocolViolation) for e in events):
            break  # the transport closes the connection here
    return events


settings.register_profile("ci", max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@given(st.binary(max_size=4096), st.lists(st.integers(0, 64), max_size=20))
def test_server_survives_random_bytes(data, sizes):
    events = feed(ServerProtocol(max_payload=1024), data, sizes)
    assert all(type(e).__name__ in EVENT_TYPES for e in events)


@given(mutated_streams(), st.lists(st.integers(0, 64), max_size=20))
def test_server_survives_mutated_frames(data, sizes):
    events = feed(ServerProtocol(max_payload=1024), data, sizes)
    assert all(type(e).__name__ in EVENT_TYPES for e in events)


@given(st.binary(max_size=4096), st.lists(st.integers(0, 64), max_size=20))
def test_client_survives_random_bytes(data, sizes):
    events = feed(ClientProtocol(max_payload=1024), data, sizes)
    assert all(type(e).__name__ in EVENT_TYPES for e in events)
