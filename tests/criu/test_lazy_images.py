"""Splitting a checkpoint's memory for post-copy, on pagemaps written byte by byte as CRIU 4.2.1 writes them."""

import json
import os
import struct

import pytest

from shim.criu import lazy_images
from shim.criu.lazy_images import PAGE_SIZE, PE_LAZY, PE_PRESENT, LazyPages, PagemapEntry, split

MAGICS = struct.pack("<II", 0x54564319, 0x56084025)


def message(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# A real entry from a CRIU 4.2.1 dump: vaddr 0x41f000 (varint 80 e0 87 02), compat_nr_pages 0, flags 4, nr_pages 1
REAL_ENTRY = bytes.fromhex("0880e08702" "1000" "2004" "2801")


def test_a_real_entry_decodes_and_encodes_back_byte_for_byte():
    entry = lazy_images.decode_entry(REAL_ENTRY)
    assert (entry.vaddr, entry.pages, entry.flags, entry.lazy) == (0x41F000, 1, PE_PRESENT, False)
    assert lazy_images.encode_entry(entry) == REAL_ENTRY


def write_images(root, entries: list[tuple[int, int, int]]) -> bytes:
    """pagemap-1.img and pages-1.img; each entry (vaddr, pages, flags); page n of the file holds bytes n."""
    root.mkdir()
    data = MAGICS + message(bytes.fromhex("0801"))  # head: pages_id 1
    for vaddr, pages, flags in entries:
        data += message(lazy_images.encode_entry(PagemapEntry(vaddr, 0, None, flags, pages)))
    (root / "pagemap-1.img").write_bytes(data)
    in_file = sum(pages for _, pages, flags in entries if flags & PE_PRESENT)
    contents = b"".join(bytes([n]) * PAGE_SIZE for n in range(in_file))
    (root / "pages-1.img").write_bytes(contents)
    (root / "core-1.img").write_bytes(b"core")
    (root / "pyshim-checkpoint.json").write_text(json.dumps({"options": {"tcp_established": True}}))
    return contents


ENTRIES = [(0x400000, 2, PE_PRESENT), (0x10000000, 3, PE_PRESENT | PE_LAZY), (0x20000000, 1, PE_PRESENT),
           (0x30000000, 2, PE_PRESENT | PE_LAZY)]


def test_split_leaves_lazy_pages_out_and_flags_them_lazy_only(tmp_path):
    contents = write_images(tmp_path / "src", ENTRIES)
    result = split(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (result.eager_pages, result.lazy_pages) == (3, 5)
    dst = tmp_path / "dst"
    flags = [e.flags for e in lazy_images.read_pagemap(str(dst / "pagemap-1.img")).entries]
    assert flags == [PE_PRESENT, PE_LAZY, PE_PRESENT, PE_LAZY]
    # pages 0,1 (first entry) and 5 (third) stay; 2-4 and 6-7 are the page server's
    page = PAGE_SIZE
    assert (dst / "pages-1.img").read_bytes() == contents[:2 * page] + contents[5 * page:6 * page]
    assert (dst / "core-1.img").read_bytes() == b"core"
    record = json.loads((dst / "pyshim-checkpoint.json").read_text())
    assert record == {"options": {"tcp_established": True}, "post_copy": {"lazy_pages": 5}}
    assert lazy_images.lazy_pages_left(record) == 5 and lazy_images.lazy_pages_left(None) == 0
    assert oct(os.stat(dst).st_mode & 0o777) == "0o700" and oct(os.stat(dst / "pages-1.img").st_mode & 0o777) == \
        "0o600"
    assert (tmp_path / "src" / "pages-1.img").read_bytes() == contents  # the source is left whole


def test_the_index_finds_each_lazy_page_in_the_original_pages_file(tmp_path):
    write_images(tmp_path / "src", ENTRIES)
    pages = LazyPages.load(str(tmp_path / "src"))
    assert pages.total == 5
    path = str(tmp_path / "src" / "pages-1.img")
    assert pages.locate(1, 0x10000000, 8) == (path, 2 * PAGE_SIZE, 3)  # clamped to its run
    assert pages.locate(1, 0x10000000 + PAGE_SIZE, 1) == (path, 3 * PAGE_SIZE, 1)
    assert pages.locate(1, 0x30000000 + PAGE_SIZE, 4) == (path, 7 * PAGE_SIZE, 1)
    assert pages.locate(1, 0x400000, 1) is None  # not lazy: restored with the images
    assert pages.locate(1, 0x10000800, 1) is None  # not page-aligned
    assert pages.locate(2, 0x10000000, 1) is None  # no such process
    pages.mark_served(1, 0x10000000, 3)
    pages.mark_served(1, 0x10000000, 1)  # served twice counts once
    assert (pages.served, pages.complete) == (3, False)
    pages.mark_served(1, 0x30000000, 2)
    assert pages.complete


def test_a_pagemap_with_fields_this_code_does_not_know_is_refused(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "pagemap-1.img").write_bytes(MAGICS + message(bytes.fromhex("0801")) + message(bytes.fromhex("0801"
                                                                                                          "3001")))
    with pytest.raises(lazy_images.ImageFormatError, match="unknown fields"):
        LazyPages.load(str(root))
    (root / "pagemap-1.img").write_bytes(b"\x19\x43\x56\x54junk")
    with pytest.raises(lazy_images.ImageFormatError, match="not a CRIU pagemap"):
        LazyPages.load(str(root))
