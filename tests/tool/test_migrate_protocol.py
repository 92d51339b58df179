"""pyshim migrate's framed protocol: frames across any split, refusal of what is not the protocol, the channel over
a pair of pipes (control messages, the archive stream with its end, page bytes both ways, end of stream)."""

from __future__ import annotations

import io
import os
import tarfile
import threading

import pytest

from shim.tool.migrate import frames
from shim.tool.migrate.channel import ArchiveWriter, Channel, ChannelClosed


def test_frames_survive_any_split():
    stream = (frames.encode_message("hello", protocol_name=frames.HELLO, protocol=frames.PROTOCOL_VERSION)
              + frames.encode(frames.ARCHIVE, b"x" * 70_000) + frames.encode(frames.ARCHIVE, b"")
              + frames.encode(frames.PAGES, bytes(range(256))))
    for step in (1, 3, 4096, len(stream)):
        decoder = frames.Decoder()
        got = []
        for offset in range(0, len(stream), step):
            got += decoder.feed(stream[offset:offset + step])
        assert [(f.kind, len(f.payload)) for f in got] == [(b"J", len(got[0].payload)), (b"D", 70_000), (b"D", 0),
                                                           (b"P", 256)]
        assert got[0].message()["type"] == "hello"
        assert decoder.pending() == 0 and decoder.received == len(got[0].payload) + 70_000 + 256


def test_what_is_not_the_protocol_is_refused_at_once():
    with pytest.raises(frames.ProtocolError, match="not pyshim's migrate protocol"):
        frames.Decoder().feed(b"Welcome to host-b!\n")  # a shell startup file writing to stdout
    with pytest.raises(frames.ProtocolError):
        frames.Decoder().feed(frames.HEADER.pack(b"J", frames.MAX_PAYLOAD + 1))
    with pytest.raises(frames.ProtocolError, match="not JSON"):
        frames.Frame(b"J", b"{nope").message()
    with pytest.raises(frames.ProtocolError, match="with a type"):
        frames.Frame(b"J", b"[1, 2]").message()
    with pytest.raises(ValueError):
        frames.encode(b"X", b"")


def test_hello_names_the_protocol_and_its_version():
    frames.check_hello({"type": "hello", "protocol_name": frames.HELLO, "protocol": frames.PROTOCOL_VERSION})
    with pytest.raises(frames.ProtocolError, match="install the same pyshim version"):
        frames.check_hello({"type": "hello", "protocol_name": frames.HELLO, "protocol": 99})
    with pytest.raises(frames.ProtocolError, match="did not greet"):
        frames.check_hello({"type": "prepared"})


def test_an_incomplete_frame_is_pending():
    decoder = frames.Decoder()
    assert decoder.feed(frames.encode(frames.PAGES, b"abcdef")[:7]) == []
    assert decoder.pending() == 7


@pytest.fixture
def pair():
    """Two channels joined by two pipes, as the source and the receiver are through ssh."""
    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    a = Channel(a_read, a_write, peer="b").start()
    b = Channel(b_read, b_write, peer="a").start()
    yield a, b
    for channel in (a, b):
        channel.close_sending()


def test_messages_and_an_archive_cross_the_channel(pair, tmp_path):
    a, b = pair
    a.send_message("prepare", container="c1", labels={"x": "y"})
    assert b.next_message(5) == {"type": "prepare", "container": "c1", "labels": {"x": "y"}}
    payload = os.urandom(3 << 20)
    (tmp_path / "pages.img").write_bytes(payload)

    def send_archive():
        writer = ArchiveWriter(a)
        with tarfile.open(fileobj=writer, mode="w|") as tar:  # type: ignore[call-overload]
            tar.add(tmp_path / "pages.img", arcname="checkpoint/pages.img")
        writer.finish()

    sender = threading.Thread(target=send_archive)
    sender.start()  # the archive is larger than the channel's queue and a pipe: the reader must keep up
    reader = b.archive_reader(timeout=10)
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        member = next(iter(tar))
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == payload
    reader.drain()
    sender.join(10)
    assert reader.done and a.sent == b.received >= len(payload)


def test_page_bytes_go_to_their_handler_both_ways(pair):
    a, b = pair
    got_b, got_a = io.BytesIO(), io.BytesIO()
    ended = threading.Event()
    b.on_pages = got_b.write
    a.on_pages = lambda data: got_a.write(data) if data else ended.set()
    a.send(frames.PAGES, b"request")
    b.send(frames.PAGES, b"answer")
    b.send(frames.PAGES, b"")
    assert ended.wait(5)
    assert got_a.getvalue() == b"answer"
    a.send_message("ping")
    assert b.next_message(5)["type"] == "ping"  # frames keep their order: the page bytes came before
    assert got_b.getvalue() == b"request"


def test_the_peer_going_away_wakes_every_waiter(pair):
    a, b = pair
    a.close_sending()
    with pytest.raises(ChannelClosed, match="closed the connection"):
        b.next_message(5)
    with pytest.raises(ChannelClosed):
        b.next_message(5)  # and the next one too
    reader = b.archive_reader(timeout=5)
    with pytest.raises(ChannelClosed):
        reader.read(10)
    with pytest.raises(ChannelClosed):
        reader.drain()  # a drain after the failure raises too, instead of waiting


def test_garbage_from_the_peer_closes_the_channel_with_the_reason():
    read_fd, write_fd = os.pipe()
    ours_read, ours_write = os.pipe()
    channel = Channel(read_fd, ours_write, peer="the destination host-b").start()
    os.write(write_fd, b"bash: pyshim: command not found\n")
    with pytest.raises(ChannelClosed, match="host-b: not pyshim's migrate protocol"):
        channel.next_message(5)
    for fd in (write_fd, ours_read):
        os.close(fd)
    channel.close_sending()


def test_no_answer_in_time_is_a_timeout(pair):
    _, b = pair
    with pytest.raises(TimeoutError, match="sent no 'running' within 0.1 s"):
        b.next_message(0.1, waiting_for="'running'")
