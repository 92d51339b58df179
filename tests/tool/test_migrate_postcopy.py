"""--post-copy's page relay without containers: a client speaking as `criu lazy-pages` connects to the destination's
unix socket, and pyshim's page server on the source answers it through two Channels joined by pipes (as ssh joins
them)."""

import json
import os
import socket
import struct
import types

import pytest

from shim.criu import page_protocol as protocol
from shim.criu.lazy_images import PAGE_SIZE, PE_LAZY, PE_PRESENT, PagemapEntry, encode_entry, split
from shim.tool.migrate import postcopy
from shim.tool.migrate.channel import Channel
from shim.tool.migrate.source import UsageRefusal, check_mode


def images(root) -> bytes:
    root.mkdir(parents=True)
    entries = [(0x400000, 1, PE_PRESENT), (0x10000000, 4, PE_PRESENT | PE_LAZY)]
    data = struct.pack("<II", 0x54564319, 0x56084025)
    for message in [bytes.fromhex("0801")] + [encode_entry(PagemapEntry(v, 0, None, f, n)) for v, n, f in entries]:
        data += struct.pack("<I", len(message)) + message
    (root / "pagemap-1.img").write_bytes(data)
    pages = b"".join(bytes([n + 1]) * PAGE_SIZE for n in range(5))
    (root / "pages-1.img").write_bytes(pages)
    return pages


def joined() -> tuple[Channel, Channel]:
    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    return (Channel(a_read, a_write, peer="the destination").start(),
            Channel(b_read, b_write, peer="the source").start())


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def test_pages_go_from_the_source_images_to_the_destination_socket_and_the_images_go(tmp_path, monkeypatch):
    monkeypatch.setattr(postcopy, "SOCKET_DIR", str(tmp_path))
    memory = tmp_path / "memory"
    contents = images(memory / "images")
    split(str(memory / "images"), str(tmp_path / "sent"))
    source_channel, destination_channel = joined()
    reports: list[dict] = []
    source = postcopy.SourcePages(source_channel, str(memory / "images"), report=reports.append)
    destination = postcopy.DestinationPages(destination_channel, "c1")
    postcopy.name_page_server(str(tmp_path / "sent"), destination.address)
    record = json.loads((tmp_path / "sent" / "pyshim-checkpoint.json").read_text())
    assert record["post_copy"] == {"lazy_pages": 4, "page_server": f"unix:{destination.path}"}
    try:
        with socket.socket(socket.AF_UNIX) as daemon:  # the shim's connection, handed to criu lazy-pages
            daemon.connect(destination.path)
            daemon.sendall(protocol.encode_header(protocol.PS_IOV_GET, nr_pages=4, vaddr=0x10000000, dst_id=1))
            answer = protocol.decode_header(receive(daemon, 32))
            assert answer.nr_pages == 4 and receive(daemon, 4 * PAGE_SIZE) == contents[PAGE_SIZE:]
            daemon.sendall(protocol.encode_header(protocol.PS_IOV_CLOSE))
            assert receive(daemon, 4) == b"\0\0\0\0"
            daemon.shutdown(socket.SHUT_WR)
            assert daemon.recv(1) == b""  # the source's side ended too
        moved = source.wait(10)
        assert destination.wait(10)
        source.remove_images()  # the caller's, once every page moved
    finally:
        source.close()
        destination.close()
    assert moved["pages"] == moved["served"] == 4 and moved["page_bytes"] >= 4 * PAGE_SIZE
    assert reports[-1]["served"] == 4
    assert not memory.exists()  # removed with the last page
    assert not os.path.exists(destination.directory)


def test_a_lost_connection_keeps_the_images(tmp_path, monkeypatch):
    monkeypatch.setattr(postcopy, "SOCKET_DIR", str(tmp_path))
    images(tmp_path / "memory" / "images")
    source_channel, destination_channel = joined()
    source = postcopy.SourcePages(source_channel, str(tmp_path / "memory" / "images"), report=lambda _: None)
    try:
        destination_channel.close_sending()  # the destination (or ssh) went away
        with pytest.raises(Exception, match="the page transfer ended after 0 of 4 pages"):
            source.wait(10)
    finally:
        source.close()
    assert (tmp_path / "memory" / "images" / "pages-1.img").exists()


def test_bandwidth_belongs_to_post_copy():
    check_mode(types.SimpleNamespace(mode="post-copy", bandwidth=4.0))
    check_mode(types.SimpleNamespace(mode="stream", bandwidth=0.0))
    with pytest.raises(UsageRefusal, match="--bandwidth limits the pages --post-copy sends"):
        check_mode(types.SimpleNamespace(mode="stream", bandwidth=4.0))
    with pytest.raises(UsageRefusal, match="above 0"):
        check_mode(types.SimpleNamespace(mode="post-copy", bandwidth=-1.0))


def test_a_connection_lost_while_pages_are_answered_ends_the_page_server(tmp_path, monkeypatch):
    """The transport dies while the page server is sending: its answers are no longer read, and it must not block
    writing them (seen: a cut migration waiting its whole timeout)."""
    monkeypatch.setattr(postcopy, "SOCKET_DIR", str(tmp_path))
    images(tmp_path / "memory" / "images")
    source_channel, destination_channel = joined()
    source = postcopy.SourcePages(source_channel, str(tmp_path / "memory" / "images"), report=lambda _: None)
    try:
        os.close(destination_channel.read_fd)  # nobody reads what the source sends: its next send fails
        request = protocol.encode_header(protocol.PS_IOV_GET, nr_pages=1, vaddr=0x10000000, dst_id=1)
        for _ in range(64):
            destination_channel.send(b"P", request)
        with pytest.raises(Exception, match="the page transfer ended after"):
            source.wait(10)
    finally:
        source.close()
