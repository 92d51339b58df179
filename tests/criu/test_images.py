import json
import os
import stat

import pytest

from shim.criu.images import RECORD, ImageError, prepare, read_record


def test_a_committed_image_is_private_and_carries_its_record(tmp_path):
    target = tmp_path / "ckpt"
    partial = prepare(str(target))
    (tmp_path / partial.path / "pages-1.img").write_bytes(b"x")
    assert not target.exists()  # nothing where the checkpoint is expected while dumping
    partial.commit({"engine": "criu"})
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "pages-1.img").stat().st_mode) == 0o600
    assert read_record(str(target)) == {"engine": "criu"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_discarded_dump_leaves_the_previous_image(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / RECORD).write_text(json.dumps({"generation": 1}))
    partial = prepare(str(target))
    (tmp_path / partial.path / "half.img").write_bytes(b"x")
    partial.discard()
    assert read_record(str(target)) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_recheckpointing_replaces_the_old_image_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.img").write_bytes(b"old")
    partial = prepare(str(target))
    partial.commit({"generation": 2})
    assert sorted(p.name for p in target.iterdir()) == [RECORD]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("bad", ["relative/path", ""])
def test_relative_paths_are_refused(bad):
    with pytest.raises(ImageError, match="absolute"):
        prepare(bad)


def test_symlinked_image_path_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "ckpt")
    with pytest.raises(ImageError, match="symbolic link"):
        prepare(str(tmp_path / "ckpt"))


def test_missing_parent_is_refused(tmp_path):
    with pytest.raises(ImageError, match="parent directory"):
        prepare(str(tmp_path / "no" / "ckpt"))


def test_images_without_a_record_are_foreign(tmp_path):
    assert read_record(str(tmp_path)) is None
