"""shim.criu.image_check: the damage a restore would hang on (pages shorter than the pagemap) or fail on obscurely
(no inventory, a truncated process tree) is named before CRIU runs. Images are written with pycriu's encoder, as
CRIU 4.2.1 writes them (a header then entries, flags PE_PRESENT / PE_LAZY as a dump sets them)."""

import os

import pytest

from shim.criu.image_check import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, ImageDamaged, check


def codec():
    from shim.criu import bindings
    from shim.errors import Unavailable

    try:
        return bindings.image_codec()
    except Unavailable as exc:
        pytest.skip(f"pycriu is installed by packaging/install.sh: {exc}")


def write(path, magic, entries):
    with open(path, "wb") as f:
        codec().dump({"magic": magic, "entries": entries}, f)


def image(tmp_path, pages=(3, 2), *, pages_file_pages=None, flags=PE_PRESENT):
    """A minimal image of one process: inventory, pstree, pagemap-1 listing `pages` runs, pages-1 holding them."""
    write(tmp_path / "inventory.img", "INVENTORY", [{"img_version": 2, "fdinfo_per_id": True}])
    write(tmp_path / "pstree.img", "PSTREE", [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]}])
    pb = codec().pb
    write(tmp_path / "pagemap-1.img", "PAGEMAP", [{"pages_id": 1}])
    with open(tmp_path / "pagemap-1.img", "ab") as f:  # pycriu's dict form spells flags as names: encode directly
        for index, count in enumerate(pages):
            entry = pb.pagemap_entry(vaddr=0x10000 * (index + 1), compat_nr_pages=0, nr_pages=count, flags=flags)
            data = entry.SerializeToString()
            f.write(len(data).to_bytes(4, "little") + data)
    total = sum(pages) if pages_file_pages is None else pages_file_pages
    (tmp_path / "pages-1.img").write_bytes(b"\0" * (total * PAGE_SIZE))
    return tmp_path


def test_an_intact_image_passes(tmp_path):
    check(str(image(tmp_path)))


def test_pages_shorter_than_the_pagemap_are_named(tmp_path):
    with pytest.raises(ImageDamaged) as damaged:
        check(str(image(tmp_path, pages_file_pages=2)))
    assert str(damaged.value) == (f"pages-1.img holds 2 of the 5 pages pagemap-1.img lists in it "
                                  f"({2 * PAGE_SIZE} of {5 * PAGE_SIZE} bytes): it was truncated")


def test_pages_kept_elsewhere_are_not_counted(tmp_path):
    check(str(image(tmp_path, pages_file_pages=0, flags=PE_LAZY)))  # a lazy dump's pages: a page server has them
    check(str(image(tmp_path, pages_file_pages=0, flags=PE_PARENT)))  # an incremental dump's: the parent has them
    with pytest.raises(ImageDamaged, match="pages-1.img holds 0 of the 5 pages"):
        check(str(image(tmp_path, pages_file_pages=0, flags=PE_PRESENT | PE_LAZY)))


def test_a_missing_pages_file(tmp_path):
    os.unlink(image(tmp_path) / "pages-1.img")
    with pytest.raises(ImageDamaged, match=r"^pages-1.img is missing: pagemap-1.img lists 5 pages in it$"):
        check(str(tmp_path))


def test_a_missing_inventory(tmp_path):
    os.unlink(image(tmp_path) / "inventory.img")
    with pytest.raises(ImageDamaged, match=r"^inventory.img is missing$"):
        check(str(tmp_path))


@pytest.mark.parametrize("keep", [0, 3, 6, 10])
def test_a_truncated_pstree(tmp_path, keep):
    path = image(tmp_path) / "pstree.img"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ImageDamaged, match=r"^pstree.img (is truncated|holds no entries)"):
        check(str(tmp_path))


def test_a_truncated_pagemap(tmp_path):
    path = image(tmp_path) / "pagemap-1.img"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ImageDamaged, match=r"^pagemap-1.img is truncated: entry 2 needs"):
        check(str(tmp_path))


def test_not_an_image(tmp_path):
    (image(tmp_path) / "inventory.img").write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    with pytest.raises(ImageDamaged, match=r"^inventory.img is not a CRIU image \(magic 0x4030201\)$"):
        check(str(tmp_path))
