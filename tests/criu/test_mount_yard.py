"""CRIU's root yard left in /tmp by a killed restore, found through the restore's log and removed only when empty."""

import os
import secrets
import string

from shim.criu.mount_yard import named_in, remove_left_behind

ALPHABET = string.ascii_letters + string.digits


def a_yard() -> str:
    path = "/tmp/.criu.mntns." + "".join(secrets.choice(ALPHABET) for _ in range(6))
    os.mkdir(path)
    return path


def log_naming(tmp_path, yard: str):
    log = tmp_path / "restore.log"
    log.write_text("(00.035551) mnt: \t\tWill mount 61 @ " + yard + "/mnt-0000000061 /sys/firmware\n"
                   "(00.062722)      1: mnt-v2: Create plain mountpoint " + yard + "/mnt-0000000085 for 85\n")
    return str(log)


def test_the_yard_a_killed_restore_logged_is_removed(tmp_path):
    yard = a_yard()
    try:
        log = log_naming(tmp_path, yard)
        assert named_in(log) == yard
        assert remove_left_behind(log) == yard and not os.path.exists(yard)
        assert remove_left_behind(log) is None  # gone already: nothing to do
    finally:
        if os.path.isdir(yard):
            os.rmdir(yard)


def test_a_yard_with_anything_in_it_is_left_alone(tmp_path):
    yard = a_yard()
    try:
        os.mkdir(os.path.join(yard, "13"))
        assert remove_left_behind(log_naming(tmp_path, yard)) is None and os.path.isdir(yard)
    finally:
        os.rmdir(os.path.join(yard, "13"))
        os.rmdir(yard)


def test_a_log_without_a_yard_or_no_log_names_none(tmp_path):
    (tmp_path / "restore.log").write_text("(00.000001) Version: 4.2.1\n(00.1) Restoring FAILED.\n")
    assert named_in(str(tmp_path / "restore.log")) is None
    assert remove_left_behind(str(tmp_path / "missing.log")) is None
