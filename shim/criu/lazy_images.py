"""A checkpoint's memory split for post-copy: what goes to the destination before it restores, and the pages a
page server keeps to serve while the restored container already runs.

CRIU marks, in every dump, the pages a lazy restore may leave for later: each `pagemap-<pid>.img` entry over private
anonymous memory (not a stack) has PE_LAZY beside PE_PRESENT, and the pages follow in `pages-<id>.img`. For the
destination, `split` writes the same images with those entries flagged PE_LAZY only and a pages file holding only
the other pages, the form CRIU's own lazy dump gives (a restore with --lazy-pages then leaves them to its
`criu lazy-pages`, which asks a page server). `LazyPages.load` indexes the original images for the page server:
where each lazy page sits in its pages file.

The pagemap messages are read and written here (two small protobuf messages, images/pagemap.proto: head
{pages_id 1}, entry {vaddr 1, compat_nr_pages 2, in_parent 3, flags 4, nr_pages 5}), so the page server needs no
pycriu.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import struct
from dataclasses import dataclass, field

from shim.protowire import encode_varint

IMG_COMMON_MAGIC = 0x54564319  # criu/include/magic.h
PAGEMAP_MAGIC = 0x56084025
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_ENTRY = 1 << 16  # bytes of one pagemap message: a few dozen in practice
ENTRY_FIELDS = {1: "vaddr", 2: "compat_nr_pages", 3: "in_parent", 4: "flags", 5: "nr_pages"}
RECORD = "pyshim-checkpoint.json"  # shim.criu.images.RECORD (not imported: the page server stays light)
RECORD_KEY = "post_copy"  # in the record of split images: how many pages a page server must serve


class ImageFormatError(ValueError):
    """A pagemap this code does not read (damaged, or from a CRIU with other fields)."""


@dataclass
class PagemapEntry:
    vaddr: int
    compat_nr_pages: int = 0
    in_parent: bool | None = None
    flags: int | None = None
    nr_pages: int | None = None

    @property
    def pages(self) -> int:
        return self.nr_pages if self.nr_pages is not None else self.compat_nr_pages

    @property
    def effective_flags(self) -> int:
        if self.flags is not None:
            return self.flags
        return PE_PARENT if self.in_parent else PE_PRESENT  # CRIU before 3.x said in_parent

    @property
    def in_pages_file(self) -> bool:
        flags = self.effective_flags
        return bool(flags & PE_PRESENT) and not flags & PE_PARENT

    @property
    def lazy(self) -> bool:
        return bool(self.effective_flags & PE_LAZY) and self.in_pages_file


@dataclass
class Pagemap:
    pages_id: int
    entries: list[PagemapEntry]


# -- protobuf, the little these two messages need ------------------------------------------------------------------

def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ImageFormatError("a varint runs past its message")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _fields(message: bytes) -> dict[int, int]:
    """Field number -> value of a message made only of varints (what both pagemap messages are)."""
    values = {}
    offset = 0
    while offset < len(message):
        key, offset = _read_varint(message, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type != 0:
            raise ImageFormatError(f"field {number} has wire type {wire_type}; a pagemap holds only varints")
        values[number], offset = _read_varint(message, offset)
    return values


def encode_entry(entry: PagemapEntry) -> bytes:
    out = (encode_varint(1 << 3) + encode_varint(entry.vaddr)
           + encode_varint(2 << 3) + encode_varint(entry.compat_nr_pages))
    if entry.in_parent is not None:
        out += encode_varint(3 << 3) + encode_varint(int(entry.in_parent))
    if entry.flags is not None:
        out += encode_varint(4 << 3) + encode_varint(entry.flags)
    if entry.nr_pages is not None:
        out += encode_varint(5 << 3) + encode_varint(entry.nr_pages)
    return out


def decode_entry(message: bytes) -> PagemapEntry:
    values = _fields(message)
    unknown = set(values) - set(ENTRY_FIELDS)
    if unknown:
        raise ImageFormatError(f"pagemap entry with unknown fields {sorted(unknown)}")
    if 1 not in values:
        raise ImageFormatError("pagemap entry without vaddr")
    return PagemapEntry(vaddr=values[1], compat_nr_pages=values.get(2, 0),
                        in_parent=bool(values[3]) if 3 in values else None, flags=values.get(4),
                        nr_pages=values.get(5))


def read_pagemap(path: str) -> Pagemap:
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise ImageFormatError(f"{name} is not a CRIU pagemap image")
    offset = 8
    messages = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise ImageFormatError(f"{name} is truncated")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if size > MAX_ENTRY or offset + size > len(data):
            raise ImageFormatError(f"{name} is truncated: an entry of {size} bytes")
        messages.append(data[offset:offset + size])
        offset += size
    if not messages:
        raise ImageFormatError(f"{name} has no head")
    head = _fields(messages[0])
    if 1 not in head:
        raise ImageFormatError(f"{name}: its head names no pages file")
    return Pagemap(head[1], [decode_entry(message) for message in messages[1:]])


def write_pagemap(path: str, pagemap: Pagemap) -> None:
    out = bytearray(struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC))
    for message in [encode_varint(1 << 3) + encode_varint(pagemap.pages_id), *map(encode_entry, pagemap.entries)]:
        out += struct.pack("<I", len(message)) + message
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(out)


def task_pagemaps(image_dir: str) -> dict[int, str]:
    """pid -> the name of its pagemap (shared memory has pagemap-shmem-*, never lazy)."""
    found = {}
    for name in os.listdir(image_dir):
        if name.startswith("pagemap-") and name.endswith(".img"):
            pid = name[len("pagemap-"):-len(".img")]
            if pid.isdigit():
                found[int(pid)] = name
    return found


# -- the page server's index -----------------------------------------------------------------------------------------

@dataclass
class LazyRun:
    """Pages [vaddr, vaddr + pages * PAGE_SIZE) of one process, at offset in its pages file."""

    vaddr: int
    pages: int
    offset: int
    served: bytearray = field(repr=False, default_factory=bytearray)

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE_SIZE


@dataclass
class ProcessPages:
    pages_file: str
    runs: list[LazyRun]
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs.sort(key=lambda run: run.vaddr)
        self.starts = [run.vaddr for run in self.runs]

    def find(self, vaddr: int) -> LazyRun | None:
        index = bisect.bisect_right(self.starts, vaddr) - 1
        if index >= 0 and vaddr < self.runs[index].end:
            return self.runs[index]
        return None


class LazyPages:
    """Where every lazy page of a checkpoint is, and which have been served."""

    def __init__(self, image_dir: str, processes: dict[int, ProcessPages]) -> None:
        self.image_dir = image_dir
        self.processes = processes
        self.total = sum(run.pages for process in processes.values() for run in process.runs)
        self.served = 0

    @classmethod
    def load(cls, image_dir: str) -> LazyPages:
        processes = {}
        for pid, name in task_pagemaps(image_dir).items():
            pagemap = read_pagemap(os.path.join(image_dir, name))
            runs, offset = [], 0
            for entry in pagemap.entries:
                if entry.lazy:
                    runs.append(LazyRun(entry.vaddr, entry.pages, offset, bytearray(entry.pages)))
                if entry.in_pages_file:
                    offset += entry.pages * PAGE_SIZE
            pages_file = os.path.join(image_dir, f"pages-{pagemap.pages_id}.img")
            if runs and os.stat(pages_file).st_size < offset:
                raise ImageFormatError(f"pages-{pagemap.pages_id}.img is shorter than {name} says")
            processes[pid] = ProcessPages(pages_file, runs)
        return cls(image_dir, processes)

    def locate(self, pid: int, vaddr: int, nr_pages: int) -> tuple[str, int, int] | None:
        """(pages file, offset, pages) for up to nr_pages lazy pages of pid from vaddr on, within one run; None
        when vaddr is no lazy page of pid."""
        process = self.processes.get(pid)
        run = process.find(vaddr) if process is not None and vaddr % PAGE_SIZE == 0 else None
        if process is None or run is None:
            return None
        first = (vaddr - run.vaddr) // PAGE_SIZE
        count = min(nr_pages, run.pages - first)
        return process.pages_file, run.offset + first * PAGE_SIZE, count

    def mark_served(self, pid: int, vaddr: int, nr_pages: int) -> None:
        run = self.processes[pid].find(vaddr)
        assert run is not None
        first = (vaddr - run.vaddr) // PAGE_SIZE
        for index in range(first, first + nr_pages):
            if not run.served[index]:
                run.served[index] = 1
                self.served += 1

    @property
    def complete(self) -> bool:
        return self.served >= self.total


# -- the destination's images ----------------------------------------------------------------------------------------

@dataclass
class Split:
    eager_pages: int  # pages that go with the images
    lazy_pages: int  # pages left to the page server


def split(source: str, destination: str) -> Split:
    """Write into the new directory destination the images of source with every lazy page left out (see the
    module's docstring); every other file is copied as it is. source is not changed."""
    os.mkdir(destination, 0o700)
    pagemaps = set(task_pagemaps(source).values())
    pages_files = set()
    eager = lazy = 0
    for name in sorted(pagemaps):
        pagemap = read_pagemap(os.path.join(source, name))
        pages_file = f"pages-{pagemap.pages_id}.img"
        pages_files.add(pages_file)
        kept, moved = _split_one(pagemap, os.path.join(source, pages_file), os.path.join(destination, pages_file))
        write_pagemap(os.path.join(destination, name), pagemap)
        eager += kept
        lazy += moved
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name in pagemaps or name in pages_files or name == RECORD or not os.path.isfile(path) \
                or os.path.islink(path):
            continue
        shutil.copyfile(path, os.path.join(destination, name))
        os.chmod(os.path.join(destination, name), 0o600)
    _write_record(source, destination, lazy)
    return Split(eager, lazy)


def _write_record(source: str, destination: str, lazy: int) -> None:
    """pyshim's record with what a restore must know: these images are not whole (shim.criu.restore refuses a
    restore that has no page server to read the rest from)."""
    try:
        with open(os.path.join(source, RECORD), "rb") as f:
            record = json.load(f)
    except FileNotFoundError:
        record = {}
    record[RECORD_KEY] = {"lazy_pages": lazy}
    fd = os.open(os.path.join(destination, RECORD), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def lazy_pages_left(record: dict | None) -> int:
    """How many pages of a checkpoint (its record given) only a page server has; 0 for a whole checkpoint."""
    post_copy = (record or {}).get(RECORD_KEY) or {}
    return int(post_copy.get("lazy_pages") or 0) if isinstance(post_copy, dict) else 0


def _split_one(pagemap: Pagemap, source_pages: str, destination_pages: str) -> tuple[int, int]:
    """Rewrite pagemap's lazy entries as PE_LAZY only and copy its other pages; (pages kept, pages left out)."""
    kept = moved = offset = 0
    fd = os.open(destination_pages, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(source_pages, "rb") if os.path.exists(source_pages) else _Empty() as pages:
            for entry in pagemap.entries:
                if not entry.in_pages_file:
                    continue
                length = entry.pages * PAGE_SIZE
                if entry.lazy:
                    entry.flags = entry.effective_flags & ~PE_PRESENT
                    moved += entry.pages
                else:
                    _copy_range(pages.fileno(), fd, offset, length)
                    kept += entry.pages
                offset += length
    finally:
        os.close(fd)
    return kept, moved


class _Empty:
    """A pagemap with no pages in its file may have no pages file at all."""

    def __enter__(self) -> _Empty:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def fileno(self) -> int:
        raise ImageFormatError("a pagemap lists pages but its pages file is missing")


def _copy_range(source_fd: int, destination_fd: int, offset: int, length: int) -> None:
    """Plain reads and writes: the eager pages are few, and the two files may be on different file systems."""
    done = 0
    while done < length:
        chunk = os.pread(source_fd, min(length - done, 1 << 20), offset + done)
        if not chunk:
            raise ImageFormatError("a pages file is shorter than its pagemap says")
        view = memoryview(chunk)
        while view:
            view = view[os.write(destination_fd, view):]
        done += len(chunk)
