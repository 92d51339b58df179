"""Process relations read from /proc."""

from __future__ import annotations

import os
import subprocess
import time

from shim.children import proctree


def test_a_shell_and_its_child_as_proc_shows_them():
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        # The child appears as a fork of the shell first and becomes `sleep` at its exec: wait for both.
        while not ((below := proctree.descendants(shell.pid)) and proctree.cmdline(below[0]) == ["sleep", "30"]):
            assert time.monotonic() < deadline, f"the shell's child never became sleep: {below}"
            time.sleep(0.01)
        (sleeper,) = below
        assert proctree.parent_of(shell.pid) == os.getpid()
        assert proctree.parent_of(sleeper) == shell.pid
        assert proctree.children_of(shell.pid) == [sleeper]
        assert shell.pid in proctree.children_by_parent()[os.getpid()]
        assert proctree.cmdline(sleeper) == ["sleep", "30"]
        assert proctree.session_of(sleeper) == proctree.session_of(shell.pid) == os.getsid(0)
    finally:
        for pid in proctree.descendants(shell.pid):
            os.kill(pid, 9)  # the sleep this test started (through its shell)
        # The shell's `wait` returns and the shell reaps the sleep. Killing the shell first could orphan the sleep to
        # this process (a child subreaper once other tests made it one), and a later reaper test would see its exit.
        try:
            shell.wait(10)
        finally:
            if shell.poll() is None:
                shell.kill()
                shell.wait(10)
    assert proctree.parent_of(shell.pid) is None and proctree.session_of(shell.pid) is None
    assert proctree.cmdline(shell.pid) == []
