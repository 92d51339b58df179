"""Files of a directory as a tar stream in D frames, and back: the migration's archive, built for speed at both ends.

The bytes are an ordinary PAX tar archive, exactly what `tarfile.open(mode="w|", format=PAX_FORMAT)` writes for the
same files (tests/tool/test_migrate_tarstream.py compares them), but not written or read through tarfile's stream
mode, which copies each byte several times in 10 KiB records, costing a GiB of pages seconds of CPU on hosts where
ssh's encryption wants every cycle:

- sending: each header from tarfile itself (gettarinfo, tobuf: names, modes, PAX records, hard links as tarfile
  makes them); each regular file's contents go by sendfile(2) from the page cache into ssh's pipe, in frames of
  PIECE bytes that start at the file's first byte;
- receiving: tarfile reads the archive through the channel's ArchiveReader as a forward-only file, and copies a
  file's contents in pieces of PIECE (copybufsize), each of which is then one whole frame, handed over as it was
  read from the pipe.

What is extracted and how (tarsafe's "data" rules) does not change.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable

from shim.tool.migrate import frames
from shim.tool.migrate.channel import PIECE, ArchiveReader, Channel, ChannelClosed

Filter = Callable[[tarfile.TarInfo], tarfile.TarInfo | None]


class TreeSender:
    """One archive: send(root, name) for each top-level entry (directories with everything below them), then
    finish(). `count` is the archive's size in bytes."""

    def __init__(self, channel: Channel, *, filter: Filter | None = None) -> None:
        self.channel = channel
        self.filter = filter
        self.count = 0
        # tarfile's own describer: headers in its format and encoding, and its record of inodes for hard links
        self._tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT)
        self._pending = bytearray()  # header and padding bytes not yet sent (sent before the next file's contents)

    def send(self, root: str, name: str) -> None:
        path = os.path.join(root, name)
        info: tarfile.TarInfo | None = self._tar.gettarinfo(path, arcname=name)  # None: a socket
        if info is None:
            return
        if self.filter is not None:
            info = self.filter(info)
            if info is None:
                return
        if info.isreg():
            self._file(path, info)
        else:
            self._header(info)
        if info.isdir():
            for child in sorted(os.listdir(path)):
                self.send(root, os.path.join(name, child))

    def finish(self) -> None:
        """The archive's end (two zero blocks, padded to a whole record, as tarfile ends it) and the empty D frame."""
        self._append(bytes(tarfile.BLOCKSIZE * 2))
        remainder = self.count % tarfile.RECORDSIZE
        if remainder:
            self._append(bytes(tarfile.RECORDSIZE - remainder))
        self._flush()
        self.channel.send(frames.ARCHIVE, b"")

    def _header(self, info: tarfile.TarInfo) -> None:
        self._append(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))

    def _file(self, path: str, info: tarfile.TarInfo) -> None:
        with open(path, "rb") as f:
            self._header(info)
            self._flush()
            self.channel.send_file(frames.ARCHIVE, f.fileno(), 0, info.size, chunk=PIECE)
            self.count += info.size
        remainder = info.size % tarfile.BLOCKSIZE
        if remainder:
            self._append(bytes(tarfile.BLOCKSIZE - remainder))

    def _append(self, data: bytes) -> None:
        self._pending += data
        self.count += len(data)
        while len(self._pending) >= PIECE:
            self.channel.send(frames.ARCHIVE, self._pending[:PIECE])
            del self._pending[:PIECE]

    def _flush(self) -> None:
        if self._pending:
            self.channel.send(frames.ARCHIVE, self._pending)
            self._pending = bytearray()


def send_tree(channel: Channel, root: str, names: list[str], *, filter: Filter | None = None) -> int:
    """The entries `names` of directory root (recursively) as one archive on the channel; its size in bytes."""
    sender = TreeSender(channel, filter=filter)
    try:
        for name in names:
            sender.send(root, name)
    except OSError:
        # a file here could not be read: the archive ends where it is (the destination finds it cut short and
        # stops waiting for the rest), and the error is this side's to report
        try:
            channel.send(frames.ARCHIVE, b"")
        except ChannelClosed:
            pass
        raise
    sender.finish()
    return sender.count


def reading(reader: ArchiveReader) -> tarfile.TarFile:
    """The archive arriving through reader, as a TarFile to iterate and extract from (in order: it reads forward
    only). tarfile.ReadError when the stream is not a tar archive or ends early."""
    return tarfile.TarFile(fileobj=reader, mode="r", copybufsize=PIECE)  # type: ignore[arg-type]
