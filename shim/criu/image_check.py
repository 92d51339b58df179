"""Checks of a checkpoint's images before a restore, for the damage CRIU does not report but hangs on.

CRIU 4.2.1 restoring from a `pages-*.img` shorter than its pagemap says does not fail: the restored process's
restorer re-reads the missing pages for ever, logging two lines per attempt (tens of MB a second at runc's log
level), and `runc restore` waits with it. A missing inventory or a truncated process tree fails fast in CRIU, but
with a message about protobuf reads; checked here, the error names the file and the fix. Each check reads image
headers and entry framing only: a pagemap is a few KB even for a GB of memory, and pages files are only stat'ed.
"""

from __future__ import annotations

import os
import struct

PE_PARENT = 1 << 0  # criu/include/pagemap.h: the page is in the parent image
PE_LAZY = 1 << 1  # served by a lazy-pages daemon or page server, maybe not in this image
PE_PRESENT = 1 << 2  # the page's contents are in this image's pages file
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_ENTRY = 1 << 24  # bytes of one image entry: a larger size field is corruption, not data


class ImageDamaged(ValueError):
    """An image a restore would fail or hang on; the message names the file and what is wrong with it."""


def check(image_dir: str) -> None:
    """Raise ImageDamaged when the images in image_dir cannot be restored: inventory.img missing or unreadable,
    pstree.img missing, unreadable or empty, a pagemap unreadable or listing more pages than its pages file holds.
    Raises shim.errors.Unavailable when pycriu (its message definitions) cannot be loaded."""
    from shim.criu import bindings

    codec = bindings.image_codec()
    pb, magic = codec.pb, codec.magic
    _entries(image_dir, "inventory.img", [pb.inventory_entry], magic, at_least=1)
    _entries(image_dir, "pstree.img", [pb.pstree_entry], magic, at_least=1)
    for name in sorted(os.listdir(image_dir)):
        if name.startswith("pagemap-") and name.endswith(".img") and not name.startswith("pagemap-shmem"):
            _check_pages(image_dir, name, pb, magic)


def _check_pages(image_dir: str, pagemap: str, pb, magic) -> None:
    head, *entries = _entries(image_dir, pagemap, [pb.pagemap_head, pb.pagemap_entry], magic, at_least=1)
    wanted = sum(_pages(entry) for entry in entries)
    if not wanted:
        return
    pages_file = f"pages-{head.pages_id}.img"
    try:
        size = os.stat(os.path.join(image_dir, pages_file)).st_size
    except FileNotFoundError:
        raise ImageDamaged(f"{pages_file} is missing: {pagemap} lists {wanted} pages in it") from None
    if size < wanted * PAGE_SIZE:
        raise ImageDamaged(f"{pages_file} holds {size // PAGE_SIZE} of the {wanted} pages {pagemap} lists in it "
                           f"({size} of {wanted * PAGE_SIZE} bytes): it was truncated")


def _pages(entry) -> int:
    """The pages of one pagemap entry stored in this image's pages file."""
    if entry.HasField("flags"):
        flags = entry.flags
    else:  # images from CRIU before 3.x say in_parent instead
        flags = PE_PARENT if entry.in_parent else PE_PRESENT
    if not flags & PE_PRESENT or flags & PE_PARENT:
        return 0
    return entry.nr_pages if entry.HasField("nr_pages") else entry.compat_nr_pages


def _entries(image_dir: str, name: str, kinds: list, magic, *, at_least: int) -> list:
    """The entries of a protobuf image: magic(s), then [u32 size][message] until the end. The first entry is of
    kinds[0], every other of kinds[-1]. Truncated framing or an unparsable message is damage."""
    path = os.path.join(image_dir, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageDamaged(f"{name} is missing") from None
    except OSError as exc:
        raise ImageDamaged(f"{name} cannot be read: {exc.strerror or exc}") from None
    offset = _skip_magic(data, name, magic)
    entries: list = []  # protobuf messages of the kinds given
    while offset < len(data):
        if offset + 4 > len(data):
            raise ImageDamaged(f"{name} is truncated: {len(data) - offset} stray bytes after entry {len(entries)}")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if size > MAX_ENTRY or offset + size > len(data):
            raise ImageDamaged(f"{name} is truncated: entry {len(entries)} needs {size} bytes, "
                               f"{len(data) - offset} remain")
        message = (kinds[0] if not entries else kinds[-1])()
        try:
            message.ParseFromString(data[offset:offset + size])
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and its relatives
            raise ImageDamaged(f"{name}: entry {len(entries)} cannot be parsed: {exc}") from None
        entries.append(message)
        offset += size
    if len(entries) < at_least:
        raise ImageDamaged(f"{name} holds no entries")
    return entries


def _skip_magic(data: bytes, name: str, magic) -> int:
    """Past the image's magic numbers (a common or service magic, then the image's own)."""
    if len(data) < 4:
        raise ImageDamaged(f"{name} is truncated ({len(data)} bytes)")
    (first,) = struct.unpack_from("<I", data, 0)
    offset = 4
    if first in (magic.by_name["IMG_COMMON"], magic.by_name["IMG_SERVICE"]):
        if len(data) < 8:
            raise ImageDamaged(f"{name} is truncated ({len(data)} bytes)")
        (first,) = struct.unpack_from("<I", data, 4)
        offset = 8
    if first not in magic.by_val:
        raise ImageDamaged(f"{name} is not a CRIU image (magic {first:#x})")
    return offset
