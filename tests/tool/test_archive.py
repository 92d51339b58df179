"""Checkpoint archives: written aside and renamed, read back in every compression, refused when corrupt or foreign."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from shim.tool import archive, rootfs
from shim.tool.errors import ToolError


def checkpoint_dir(tmp_path):
    directory = tmp_path / "cp"
    (directory / "checkpoint").mkdir(parents=True)
    (directory / "checkpoint" / "inventory.img").write_bytes(b"inventory")
    (directory / "checkpoint" / "pages-1.img").write_bytes(os.urandom(300_000))
    (directory / "spec.dump").write_text("{}")
    (directory / "config.dump").write_text('{"id": "c1"}')
    return directory


@pytest.mark.parametrize("suffix, magic", [(".tar", None), (".tar.gz", b"\x1f\x8b"), (".tar.zst", b"\x28\xb5\x2f\xfd")])
def test_round_trip_in_each_compression(tmp_path, suffix, magic):
    source = checkpoint_dir(tmp_path)
    target = tmp_path / f"out{suffix}"
    size = archive.write(str(source), str(target))
    assert size == target.stat().st_size
    assert sorted(os.listdir(tmp_path)) == sorted(["cp", target.name])  # no partial file left
    if magic:
        assert target.read_bytes()[:len(magic)] == magic
    back = tmp_path / "back"
    back.mkdir()
    archive.extract(str(target), str(back))
    archive.check_layout(str(back), str(target))
    assert (back / "checkpoint" / "pages-1.img").read_bytes() == (source / "checkpoint" / "pages-1.img").read_bytes()
    # the top-level files come first, as Podman writes them
    names = archive.names(str(target))
    assert names.index("spec.dump") < names.index("checkpoint")


def test_unknown_suffix_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ToolError, match=r"\.tar, \.tar\.gz or \.tar\.zst"):
        archive.write(str(checkpoint_dir(tmp_path)), str(tmp_path / "out.zip"))
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_truncated_archives_are_corrupt(tmp_path, suffix):
    target = tmp_path / f"out{suffix}"
    archive.write(str(checkpoint_dir(tmp_path)), str(target))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    (tmp_path / "back").mkdir()
    with pytest.raises(ToolError, match="corrupt"):
        archive.extract(str(target), str(tmp_path / "back"))


def test_a_foreign_archive_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "hello").write_text("hi")
    with pytest.raises(ToolError, match="not a container checkpoint"):
        archive.check_layout(str(tmp_path / "x"), "foreign.tar")


def test_entries_outside_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped")
        tar.addfile(info)
    (tmp_path / "back").mkdir()
    with pytest.raises(ToolError, match="outside"):
        archive.extract(str(evil), str(tmp_path / "back"))
    assert not (tmp_path / "escaped").exists()


def test_a_rootfs_diff_applies_files_and_deletions_to_a_plain_directory(tmp_path):
    diff = tmp_path / "diff.tar"
    with tarfile.open(diff, "w") as tar:
        for name in ("etc", "new"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        tar.addfile(tarfile.TarInfo("etc/.wh.group"))
        tar.addfile(tarfile.TarInfo("new/.wh..wh..opq"))
        data = b"hello\n"
        info = tarfile.TarInfo("new/file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = tmp_path / "rootfs"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "group").write_text("root:x:0:\n")
    (layer / "etc" / "passwd").write_text("root\n")
    (layer / "new").mkdir()
    (layer / "new" / "old").write_text("hidden by the opaque marker\n")
    rootfs.apply_diff(str(diff), "directory", str(layer))
    assert sorted(os.listdir(layer / "etc")) == ["passwd"]
    assert sorted(os.listdir(layer / "new")) == ["file"]
    assert (layer / "new" / "file").read_text() == "hello\n"
