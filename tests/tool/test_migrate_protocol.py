"""pyshim migrate's framed protocol: frames across any split, refusal of what is not the protocol, the channel over
a pair of pipes (control messages, the archive stream with its end, a file's bytes by sendfile, page bytes both ways,
end of stream)."""

from __future__ import annotations

import io
import os
import threading

import pytest

from shim.tool.migrate import frames, tarstream
from shim.tool.migrate.channel import Channel, ChannelClosed


def test_a_header_says_kind_and_length_and_refuses_what_is_not_ours():
    assert frames.parse_header(frames.header(frames.ARCHIVE, 70_000)) == (b"D", 70_000)
    assert frames.encode(frames.PAGES, b"abc") == b"P\x00\x00\x00\x03abc"
    with pytest.raises(frames.ProtocolError, match="not pyshim's migrate protocol"):
        frames.parse_header(b"Welco")  # a shell startup file writing to stdout
    with pytest.raises(frames.ProtocolError):
        frames.parse_header(frames.HEADER.pack(b"J", frames.MAX_PAYLOAD + 1))
    with pytest.raises(frames.ProtocolError, match="not JSON"):
        frames.Frame(b"J", b"{nope").message()
    with pytest.raises(frames.ProtocolError, match="with a type"):
        frames.Frame(b"J", b"[1, 2]").message()
    with pytest.raises(ValueError):
        frames.encode(b"X", b"")
    with pytest.raises(ValueError):
        frames.header(frames.ARCHIVE, frames.MAX_PAYLOAD + 1)


def test_hello_names_the_protocol_and_its_version():
    frames.check_hello({"type": "hello", "protocol_name": frames.HELLO, "protocol": frames.PROTOCOL_VERSION})
    with pytest.raises(frames.ProtocolError, match="install the same pyshim version"):
        frames.check_hello({"type": "hello", "protocol_name": frames.HELLO, "protocol": 99})
    with pytest.raises(frames.ProtocolError, match="did not greet"):
        frames.check_hello({"type": "prepared"})


def test_frames_survive_any_split():
    stream = (frames.encode_message("hello", protocol_name=frames.HELLO, protocol=frames.PROTOCOL_VERSION)
              + frames.encode(frames.ARCHIVE, b"x" * 70_000) + frames.encode(frames.ARCHIVE, b"")
              + frames.encode(frames.PAGES, bytes(range(256))) + frames.encode_message("done"))
    for step in (1, 3, 4096, len(stream)):
        read_fd, write_fd = os.pipe()
        ours_read, ours_write = os.pipe()
        pages = io.BytesIO()
        channel = Channel(read_fd, ours_write, peer="b")
        channel.on_pages = pages.write
        channel.start()

        def write(step=step, write_fd=write_fd):
            for offset in range(0, len(stream), step):
                os.write(write_fd, stream[offset:offset + step])

        writer = threading.Thread(target=write)
        writer.start()
        assert channel.next_message(5)["type"] == "hello"
        reader = channel.archive_reader(timeout=5)
        assert bytes(reader.read(-1)) == b"x" * 70_000 and reader.done
        assert channel.next_message(5)["type"] == "done"  # frames keep their order: the pages came before
        assert pages.getvalue() == bytes(range(256))
        writer.join(5)
        assert channel.received == len(stream) - 5 * frames.HEADER.size
        for fd in (write_fd, ours_read):
            os.close(fd)
        channel.close_sending()


def test_a_stream_ending_inside_a_frame_says_so():
    read_fd, write_fd = os.pipe()
    ours_read, ours_write = os.pipe()
    channel = Channel(read_fd, ours_write, peer="b").start()
    os.write(write_fd, frames.encode(frames.PAGES, b"abcdef")[:7])
    os.close(write_fd)
    with pytest.raises(ChannelClosed, match="in the middle of a frame"):
        channel.next_message(5)
    os.close(ours_read)
    channel.close_sending()


def test_messages_and_an_archive_cross_the_channel(pair, tmp_path):
    a, b = pair
    a.send_message("prepare", container="c1", labels={"x": "y"})
    assert b.next_message(5) == {"type": "prepare", "container": "c1", "labels": {"x": "y"}}
    payload = os.urandom(3 << 20)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "pages.img").write_bytes(payload)

    sender = threading.Thread(target=tarstream.send_tree, args=(a, str(tmp_path), ["checkpoint"]))
    sender.start()  # the archive is larger than the channel's queue and a pipe: the reader must keep up
    reader = b.archive_reader(timeout=10)
    with tarstream.reading(reader) as tar:
        names = [member.name for member in tar]
        assert names == ["checkpoint", "checkpoint/pages.img"]
    reader.drain()
    sender.join(10)
    assert reader.done and a.sent == b.received >= len(payload)


def test_a_file_cut_while_sent_leaves_the_stream_whole(pair, tmp_path):
    """send_file promised `count` bytes in each header: a file that has fewer gets zeros, and the error."""
    a, b = pair
    path = tmp_path / "pages.img"
    path.write_bytes(b"p" * 1000)
    with open(path, "rb") as f, pytest.raises(OSError, match="ended at byte 1000"):
        a.send_file(frames.ARCHIVE, f.fileno(), 0, 2500, chunk=2000)
    a.send_message("after")
    reader = b.archive_reader(timeout=5)
    assert bytes(reader.read(2000)) == b"p" * 1000 + bytes(1000)
    assert b.next_message(5)["type"] == "after"  # the frame was completed: what follows is read as frames


def test_the_archive_reader_hands_whole_frames_over_and_reads_forward_only(pair):
    a, b = pair
    first, second = os.urandom(1000), os.urandom(3000)
    a.send(frames.ARCHIVE, first)
    a.send(frames.ARCHIVE, second)
    a.send(frames.ARCHIVE, b"")
    reader = b.archive_reader(timeout=5)
    whole = reader.read(1000)
    assert isinstance(whole, bytearray) and whole == first  # the buffer the frame was read into: no copy
    assert reader.read(100) == second[:100] and reader.tell() == 1100
    assert reader.seek(2000) == 2000
    with pytest.raises(OSError, match="forward only"):
        reader.seek(10)
    assert reader.read(5000) == second[1000:] and reader.read(10) == b"" and reader.done


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
