"""Image and work paths, and option values, refused before anything is written (shim.criu.options)."""

from __future__ import annotations

import math

import pytest

from shim.criu.options import OptionError, check_path, check_restore_paths, from_annotations, resolve


@pytest.mark.parametrize("path, message", [
    ("relative/dir", "must be an absolute path"),
    ("/tmp/a/../b", "must not contain '..'"),
    ("/tmp/a/..", "must not contain '..'"),
    ("/proc/self/x", "kernel filesystem"),
    ("/proc/self/cwd/x", "kernel filesystem"),  # resolves elsewhere, but is written as /proc
    ("/sys", "kernel filesystem"),
    ("/dev/x", "kernel filesystem"),
    ("/", "root directory"),
    ("/tmp/a\0b", "NUL byte"),
])
def test_bad_paths_are_refused(path, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_path("image-path", path)


def test_dev_shm_is_a_place_for_images(tmp_path):
    check_path("image-path", "/dev/shm/pyshim-images")


def test_a_link_on_the_way_is_followed_and_what_it_leads_to_checked(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "moved").symlink_to(tmp_path / "real")
    check_path("image-path", str(tmp_path / "moved" / "images"))
    (tmp_path / "into-proc").symlink_to("/proc")
    with pytest.raises(OptionError, match=r"that is /proc/images"):
        check_path("image-path", str(tmp_path / "into-proc" / "images"))


def test_a_link_as_the_last_component_is_refused_for_writing_only(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OptionError, match="symbolic link"):
        check_path("work-path", str(tmp_path / "link"))
    check_restore_paths(str(tmp_path / "link"), "")  # an image to read may be reached through a link
    with pytest.raises(OptionError, match="checkpoint work path .* symbolic link"):
        check_restore_paths(str(tmp_path / "real"), str(tmp_path / "link"))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e999", str(8 * 24 * 3600)])
def test_timeouts_that_are_not_a_sane_number_of_seconds_are_refused(value):
    with pytest.raises(OptionError, match="timeout"):
        resolve(from_annotations({"io.pyshim.checkpoint.timeout": value}))


def test_a_sane_timeout_is_kept():
    assert math.isclose(resolve(from_annotations({"io.pyshim.checkpoint.timeout": "30"})).timeout, 30.0)


def test_annotations_that_are_not_a_map_are_refused():
    with pytest.raises(OptionError, match="not a map"):
        from_annotations(["io.pyshim.checkpoint.timeout=1"])  # type: ignore[arg-type]
