"""The migration's archive (shim/tool/migrate/tarstream.py): byte for byte the tar stream tarfile writes, read back
through the channel into the same files, and a stream cut short is an error on both sides."""

from __future__ import annotations

import io
import os
import tarfile
import threading

import pytest

from shim.tool import archive, tarsafe
from shim.tool.migrate import frames, tarstream
from shim.tool.migrate.channel import PIECE


@pytest.fixture
def tree(tmp_path):
    """A staging directory like a migration's: files around the frame size, an empty one, a hard link, a symlink."""
    root = tmp_path / "staging"
    images = root / "checkpoint"
    images.mkdir(parents=True)
    (images / "pages-1.img").write_bytes(os.urandom(2 * PIECE + 123))
    (images / "pages-2.img").write_bytes(os.urandom(PIECE))
    (images / "inventory.img").write_bytes(b"inventory")
    (images / "empty.img").write_bytes(b"")
    os.link(images / "inventory.img", images / "linked.img")
    os.symlink("../round-1", images / "parent")
    (root / "spec.dump").write_text("{}")
    (root / "rootfs-diff.tar").write_bytes(os.urandom(10_000))
    return root


def send_in_thread(channel, root, names):
    outcome: dict = {}

    def run():
        outcome["count"] = tarstream.send_tree(channel, str(root), names, filter=archive._owned_by_root)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_stream_is_what_tarfile_writes(pair, tree):
    a, b = pair
    names = archive._entries(str(tree))
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            tar.add(tree / name, arcname=name, filter=archive._owned_by_root)
    thread, outcome = send_in_thread(a, tree, names)
    reader = b.archive_reader(timeout=10)
    got = bytes(reader.read(-1))
    thread.join(10)
    assert got == expected.getvalue()
    assert outcome["count"] == len(got) and reader.done


def test_the_files_arrive_as_they_were(pair, tree, tmp_path):
    a, b = pair
    names = archive._entries(str(tree))
    thread, outcome = send_in_thread(a, tree, names)
    work = tmp_path / "work"
    work.mkdir()
    reader = b.archive_reader(timeout=10)
    with tarstream.reading(reader) as tar:
        for member in tar:
            tarsafe.extract(tar, member, str(work), data=True)
    reader.drain()
    thread.join(10)
    for path in tree.rglob("*"):
        copy = work / path.relative_to(tree)
        if path.is_symlink():
            assert os.readlink(copy) == os.readlink(path)
        elif path.is_file():
            assert copy.read_bytes() == path.read_bytes(), path
    assert os.stat(work / "checkpoint" / "linked.img").st_ino == os.stat(work / "checkpoint" / "inventory.img").st_ino
    assert reader.count == outcome["count"]


def test_a_stream_tarfile_wrote_in_other_pieces_is_read_too(pair, tree, tmp_path):
    """Frames that do not start at a file's first byte (tarfile's stream mode cut in 1 MiB frames) cost copies,
    not correctness."""
    a, b = pair
    names = archive._entries(str(tree))
    written = io.BytesIO()
    with tarfile.open(fileobj=written, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            tar.add(tree / name, arcname=name)
    data = written.getvalue()

    def send():
        for offset in range(0, len(data), 100_000):
            a.send(frames.ARCHIVE, data[offset:offset + 100_000])
        a.send(frames.ARCHIVE, b"")

    thread = threading.Thread(target=send)
    thread.start()
    reader = b.archive_reader(timeout=10)
    with tarstream.reading(reader) as tar:
        for member in tar:
            tarsafe.extract(tar, member, str(tmp_path), data=True)
    thread.join(10)
    assert (tmp_path / "checkpoint" / "pages-1.img").read_bytes() == (tree / "checkpoint" / "pages-1.img").read_bytes()


def test_a_file_cut_while_sent_ends_the_archive_early(pair, tree, tmp_path):
    """The sender's error is its own to report; the receiver is not left waiting for the rest, and reads a damaged
    archive (tarfile.ReadError), which the receiver reports as one."""
    a, b = pair
    pages = tree / "checkpoint" / "pages-1.img"

    def cut(info):
        if info.name.endswith("pages-1.img"):
            os.truncate(pages, PIECE + 10)  # after its size went into the header
        return info

    outcome: dict = {}

    def send():
        try:
            tarstream.send_tree(a, str(tree), ["checkpoint"], filter=cut)
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    reader = b.archive_reader(timeout=10)
    with pytest.raises(tarfile.ReadError):
        with tarstream.reading(reader) as tar:
            for member in tar:
                tarsafe.extract(tar, member, str(tmp_path), data=True)
    reader.drain()
    thread.join(10)
    assert "ended at byte 262154" in str(outcome.get("error"))
    a.send_message("after")
    assert b.next_message(5)["type"] == "after"  # the channel itself is intact


def test_an_archive_cut_inside_a_file_is_a_read_error(pair, tree, tmp_path):
    a, b = pair
    written = io.BytesIO()
    with tarfile.open(fileobj=written, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree / "checkpoint" / "pages-1.img", arcname="pages-1.img")
    a.send(frames.ARCHIVE, written.getvalue()[:PIECE])
    a.send(frames.ARCHIVE, b"")
    reader = b.archive_reader(timeout=10)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        with tarstream.reading(reader) as tar:
            for member in tar:
                tarsafe.extract(tar, member, str(tmp_path), data=True)
