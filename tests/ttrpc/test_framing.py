import pytest

from shim.ttrpc.framing import HEADER, Frame, FrameReader, FrameTooLarge, FrameType, OversizedFrame, encode_frame


def test_header_layout_is_length_stream_type_flags_big_endian():
    frame = encode_frame(7, FrameType.REQUEST, b"abc", flags=0x2)
    assert frame == b"\x00\x00\x00\x03" b"\x00\x00\x00\x07" b"\x01" b"\x02" b"abc"


def test_round_trip_survives_any_split():
    frames = [encode_frame(i * 2 + 1, FrameType.RESPONSE, bytes([i]) * i) for i in range(20)]
    stream = b"".join(frames)
    for chunk in (1, 3, 10, 11, 64, len(stream)):
        reader = FrameReader()
        got = []
        for pos in range(0, len(stream), chunk):
            got += reader.feed(stream[pos:pos + chunk])
        assert got == [Frame(i * 2 + 1, FrameType.RESPONSE, 0, bytes([i]) * i) for i in range(20)]
        assert reader.buffered == 0


def test_oversized_frame_is_reported_and_skipped_without_buffering():
    reader = FrameReader(max_payload=16)
    big = HEADER.pack(100, 3, FrameType.REQUEST, 0)
    events = reader.feed(big + b"x" * 40)
    assert events == [OversizedFrame(3, FrameType.REQUEST, 100)]
    assert reader.buffered == 0
    # the rest of the oversized payload arrives, then a normal frame right behind it
    events = reader.feed(b"x" * 60 + encode_frame(5, FrameType.REQUEST, b"ok"))
    assert events == [Frame(5, FrameType.REQUEST, 0, b"ok")]


def test_encoding_refuses_payload_over_limit():
    with pytest.raises(FrameTooLarge):
        encode_frame(1, FrameType.REQUEST, b"x" * 17, max_payload=16)
    assert len(encode_frame(1, FrameType.REQUEST, b"x" * 16, max_payload=16)) == HEADER.size + 16
