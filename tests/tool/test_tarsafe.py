"""Untrusted tar members, with tarfile's filters and without them (Debian 12's Python 3.11.2 has none): the same
members are extracted and the same are refused either way."""

import io
import os
import stat
import tarfile

import pytest

from shim.tool import tarsafe

WAYS = [pytest.param(False, id="own-checks")] + ([pytest.param(True, id="tarfile-filters")]
                                                  if tarsafe.HAS_FILTERS else [])


def archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r")


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def extract_all(tar: tarfile.TarFile, destination, data: bool, use_filters: bool) -> None:
    for member in tar:
        tarsafe.extract(tar, member, str(destination), data=data, use_filters=use_filters)


@pytest.mark.parametrize("use_filters", WAYS)
def test_plain_files_and_inner_links_are_extracted(tmp_path, use_filters):
    tar = archive((entry("dir", tarfile.DIRTYPE, mode=0o755), None), (entry("dir/file"), b"content"),
                  (entry("dir/link", tarfile.SYMTYPE, "file"), None),
                  (entry("hard", tarfile.LNKTYPE, "dir/file"), None))
    extract_all(tar, tmp_path, data=True, use_filters=use_filters)
    assert (tmp_path / "dir/file").read_bytes() == b"content"
    assert os.readlink(tmp_path / "dir/link") == "file"
    assert (tmp_path / "hard").read_bytes() == b"content"


@pytest.mark.parametrize("use_filters", WAYS)
@pytest.mark.parametrize("member", [
    (entry("../escape"), b"x"),
    (entry("a/../../escape"), b"x"),
    (entry("up", tarfile.SYMTYPE, "../outside"), None),
    (entry("abs", tarfile.SYMTYPE, "/etc/passwd"), None),
    (entry("hard", tarfile.LNKTYPE, "../outside"), None),
    (entry("fifo", tarfile.FIFOTYPE), None),
], ids=["dotdot", "nested-dotdot", "symlink-up", "symlink-absolute", "hardlink-up", "fifo"])
def test_data_mode_refuses_what_could_reach_outside(tmp_path, use_filters, member):
    destination = tmp_path / "into"
    destination.mkdir()
    with pytest.raises(tarsafe.REFUSED):
        extract_all(archive(member), destination, data=True, use_filters=use_filters)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["into"]


@pytest.mark.parametrize("use_filters", WAYS)
def test_data_mode_drops_setuid_and_group_write(tmp_path, use_filters):
    extract_all(archive((entry("tool", mode=0o6775), b"#!")), tmp_path, data=True, use_filters=use_filters)
    mode = stat.S_IMODE((tmp_path / "tool").stat().st_mode)
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP)


@pytest.mark.parametrize("use_filters", WAYS)
def test_rootfs_mode_keeps_absolute_symlinks_but_not_escapes(tmp_path, use_filters):
    extract_all(archive((entry("bin", tarfile.DIRTYPE, mode=0o755), None),
                        (entry("bin/sh", tarfile.SYMTYPE, "/bin/busybox"), None)), tmp_path, data=False,
                use_filters=use_filters)
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"
    with pytest.raises(tarsafe.REFUSED):
        extract_all(archive((entry("../escape"), b"x")), tmp_path / "bin", data=False, use_filters=use_filters)
    assert not (tmp_path / "escape").exists()
