"""Holding another process's userfaultfds (shim.criu.userfaultfd), with a child that made one in user mode
(UFFD_USER_MODE_ONLY: allowed without privileges)."""

import os
import platform
import subprocess
import sys

import pytest

from shim.criu.userfaultfd import UserfaultfdHold, supported, userfaultfds

MAKES_ONE = ("import ctypes, os, sys, time; libc = ctypes.CDLL(None, use_errno=True); "
             "fd = libc.syscall({nr}, 0x80001); "  # O_CLOEXEC | UFFD_USER_MODE_ONLY
             "print(fd, ctypes.get_errno(), flush=True); sys.stdin.read()")
USERFAULTFD_NR = {"x86_64": 323, "aarch64": 282}


@pytest.mark.skipif(not supported(), reason=f"no syscall numbers known for {platform.machine()}")
def test_a_childs_userfaultfd_is_held_once_and_let_go():
    child = subprocess.Popen([sys.executable, "-c", MAKES_ONE.format(nr=USERFAULTFD_NR[platform.machine()])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pidfd = os.pidfd_open(child.pid)
    try:
        fd, errno = map(int, child.stdout.readline().split())
        if fd < 0:
            pytest.skip(f"userfaultfd refused here (errno {errno}): vm.unprivileged_userfaultfd or seccomp")
        assert userfaultfds(child.pid) == [fd]
        hold = UserfaultfdHold(child.pid, pidfd)
        try:
            assert hold.take() == 1
            assert hold.take() == 1  # the same one (kcmp), not taken twice
            ours = hold.held[fd]
            assert os.readlink(f"/proc/self/fd/{ours}") == "anon_inode:[userfaultfd]"
        except PermissionError as exc:
            pytest.skip(f"pidfd_getfd not permitted here: {exc}")
        finally:
            hold.release()
        assert not os.path.exists(f"/proc/self/fd/{ours}") or \
            os.readlink(f"/proc/self/fd/{ours}") != "anon_inode:[userfaultfd]"
    finally:
        os.close(pidfd)
        child.stdin.close()
        child.wait(10)
