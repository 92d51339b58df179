"""Namespace references and the thread helpers (unprivileged)."""

from __future__ import annotations

import os
import threading

import pytest

from shim.netns.enter import in_thread, run_in
from shim.netns.inodes import inode_of, namespaces_of, same_namespace
from shim.netns.refs import RUN_DIR, open_namespace, path_of


def test_a_name_lives_in_the_run_dir_and_a_path_is_taken_as_is():
    assert path_of("blue") == f"{RUN_DIR}/blue"
    assert path_of("/proc/1/ns/net") == "/proc/1/ns/net"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_names_that_would_escape_the_run_dir_are_refused(bad):
    with pytest.raises(ValueError):
        path_of(bad)


def test_opening_a_missing_namespace_never_creates_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError):
        open_namespace(str(missing))
    assert not missing.exists()


def test_run_in_none_is_a_plain_call_on_the_same_thread():
    assert run_in(None, threading.get_ident) == threading.get_ident()


def test_in_thread_returns_the_result_and_re_raises_the_exception():
    assert in_thread(lambda a, b: a + b, 2, 3) == 5
    assert in_thread(threading.get_ident) != threading.get_ident()

    def fails():
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        in_thread(fails)


def test_in_thread_is_bounded_in_time():
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError, match="still running"):
            in_thread(release.wait, 5, timeout=0.05)
    finally:
        release.set()


def test_a_process_namespaces_by_inode():
    mine = namespaces_of(os.getpid())
    assert {"network", "pid", "mount"} <= mine.keys()
    assert mine["network"] == inode_of("/proc/self/ns/net")
    assert same_namespace("/proc/self/ns/net", f"/proc/{os.getpid()}/ns/net")


def test_namespaces_of_a_process_that_does_not_exist():
    with pytest.raises(ProcessLookupError):
        namespaces_of(2**22 + 1)  # above the default pid_max
